"""The `kvgate` command.

    kvgate serve [--config FILE] [--host H] [--port N] [--set section.key=value ...]
    kvgate bench [--base-url URL] [--workloads gsp,unique,decode1,chat] [--json F] [--plots DIR]
    kvgate keygen                  # a CURVE key pair for KV events beyond loopback (docs/scale-out.md)

With no arguments it serves the built-in demo model on 127.0.0.1:8000 (on the GPU if there is
one). SIGINT / SIGTERM shut it down gracefully: no new requests, streams in flight end, cached
GPU and host blocks are written to the disk tier, LMDB is closed.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys

from gateway import bench, version
from gateway.config import ConfigError, load_config

# Only what parsing the arguments and validating the configuration needs is imported here:
# `--help`, `--version` and a configuration error answer before torch or transformers load.


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvgate", description="KV-cache-aware OpenAI-compatible LLM server")
    parser.add_argument("--version", action="version", version=f"kvgate {version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the server")
    serve.add_argument("--config", help="TOML configuration file (see configs/default.toml)")
    serve.add_argument("--host", help="overrides server.host")
    serve.add_argument("--port", type=int, help="overrides server.port")
    serve.add_argument("--replicas", type=int, help="overrides replicas.num_replicas: N engine replicas on Ray "
                       "Serve, routed by cached prefix (docs/scale-out.md)")
    serve.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override any configuration key with a TOML value (repeatable)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    bench.add_arguments(commands.add_parser("bench", help="run the benchmark workloads against a server"))
    commands.add_parser("keygen", help="print a CURVE key pair (Z85) for kv_events: the server's secret key, "
                        "or a subscriber's public key for kv_events.curve_client_keys")
    args = parser.parse_args(argv)
    if args.command == "keygen":
        import zmq
        public, secret = zmq.curve_keypair()
        print(f"public_key = \"{public.decode()}\"\nsecret_key = \"{secret.decode()}\"")
        return 0
    if args.command == "bench":
        import asyncio

        import aiohttp

        from gateway.bench import client as bench_module
        try:
            asyncio.run(bench_module.main_async(args))
        except (aiohttp.ClientError, OSError) as e:     # the server is not there, or went away
            print(f"kvgate bench: {args.base_url}: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        return 0
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides)
    if args.host:
        overrides.append(f"server.host={args.host!r}".replace("'", '"'))
    if args.port:
        overrides.append(f"server.port={args.port}")
    if args.replicas is not None:
        overrides.append(f"replicas.num_replicas={args.replicas}")
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"kvgate: configuration error: {e}", file=sys.stderr)
        return 2
    try:
        sock = listen_socket(config.server.host, config.server.port)
    except ConfigError as e:
        print(f"kvgate: configuration error: {e}", file=sys.stderr)
        return 2
    print(f"kvgate {version()}: starting {config.model.path} on {config.server.host}:{config.server.port} "
          "(loading the model, sizing the KV tiers, warming up)", flush=True)
    from gateway.app import init_app
    from gateway.engines.pipe import EngineStartError
    from gateway.server import run
    try:
        return run(init_app(config, log_level=args.log_level), sock,
                   banner=f"kvgate: serving {config.model.path} on http://{config.server.host}:{config.server.port}")
    except ConfigError as e:       # found while starting: the model, the disk tier's directory
        print(f"kvgate: configuration error: {e}", file=sys.stderr)
        return 2
    except EngineStartError as e:
        print(f"kvgate: the engine could not start: {e}", file=sys.stderr)
        return 2


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything loads: an address in use is one line naming
    server.port (ConfigError) at once, not a traceback after the model has loaded."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ConfigError(f"server.host: cannot resolve {host!r}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as aiohttp does: TIME_WAIT is no conflict
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"server.port: {host}:{port} is in use (another kvgate, or another server)") from None
        raise ConfigError(f"server.host: cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def entry() -> None:
    """The `kvgate` console script: `main`, then exit at once. Everything is closed by then (the
    engine process joined, LMDB closed, the port shut); the interpreter's own teardown of torch's
    modules (a second or more) would only keep a process that refuses connections alive, while
    its supervisor waits to restart it."""
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
