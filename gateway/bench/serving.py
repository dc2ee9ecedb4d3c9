"""HTTP ÷ in-process: what serving over HTTP costs, measured on the same workloads and settings.

    python -m gateway.bench.serving [--workloads gsp,chat] [--scale 1] [--length-scale 1] \\
        [--set section.key=value ...] [--json out.json]

For each workload, twice, each time on a fresh engine with an empty cache built from the same
configuration (the `--set` keys, as `kvgate serve` takes them):
  in-process  the engine in one process (a child of this one), driven by `kvgate bench`'s own workload code through a
              client that calls `Engine.generate` instead of HTTP;
  over HTTP   a `kvgate serve` subprocess, measured by `kvgate bench`'s HTTP client.
So the prompts, their timing and the measurements are the same code; the difference is the
serving path: HTTP parsing, validation, tokenization, the pipe between the API process and the
engine process, detokenization and SSE framing. Each measurement runs in a process of its own.
Each engine gets its own empty cache directory (XDG_CACHE_HOME). The table gives both, and
HTTP ÷ in-process for throughput and TTFT.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time

import aiohttp

from engine.engine import Engine
from engine.model import load_model
from engine.sampling import SamplingParams
from engine.serving.tiers import open_engine
from gateway.bench import BENCH_MODEL
from gateway.bench import client as bench
from gateway.config import load_config


class InProcessClient:
    """`bench.Client`'s `complete`, on an engine in this process."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def complete(self, workload: str, prompt: list[int], max_tokens: int, progress: bench.Progress,
                       round_: int = 0) -> bench.Sample:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        first = last = out = None
        tokens: list[int] = []
        async for out in self.engine.generate(prompt, params):
            if out.token_ids:
                last = time.perf_counter()
                first = first or last
                tokens += out.token_ids
        progress.step()
        cached = {t.name.lower(): n for t, n in out.cached_tokens.items()}
        return bench.Sample(workload, out.prompt_tokens, out.completion_tokens, first - start, last - first,
                            cached, round_, tokens)


async def in_process(overrides: list[str], name: str, a: argparse.Namespace) -> dict:
    """The in-process measurement, in a child process of its own: on CUDA a stopped engine's
    memory is not returned to the device (docs/benchmarks.md), and the server measured next
    needs it."""
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        return await asyncio.get_running_loop().run_in_executor(
            pool, _in_process_child, overrides, name, a.scale, a.length_scale)


def _in_process_child(overrides: list[str], name: str, scale: float, length_scale: float) -> dict:
    return asyncio.run(_measure_in_process(overrides, name, scale, length_scale))


async def _measure_in_process(overrides: list[str], name: str, scale: float, length_scale: float) -> dict:
    config = load_config(None, overrides)
    loaded = load_model(config.model, config.engine.block_size)
    engine, _ = open_engine(config, loaded, lambda store: Engine(loaded, config.engine, store))
    await engine.start()
    try:
        samples, wall = await bench.run_workload(InProcessClient(engine), name, loaded.model.config.vocab_size,
                                                 scale, length_scale)
    finally:
        await engine.stop(persist=False)
    return bench.summarize(name, samples, wall)


async def over_http(overrides: list[str], name: str, a: argparse.Namespace, port: int) -> dict:
    sets = [arg for o in overrides for arg in ("--set", o)]
    server = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", str(port), *sets,
                               "--log-level", "warning"])
    base = f"http://127.0.0.1:{port}/v1"
    try:
        async with bench.session_for_workloads() as session:
            await _wait_healthy(session, base, server)
            async with session.get(base + "/models") as resp:
                card = (await resp.json())["data"][0]
            client = bench.Client(base, card["id"], None)
            client.session = session
            before = cpu_seconds(server.pid)
            samples, wall = await bench.run_workload(client, name, card.get("vocab_size") or 256,
                                                     a.scale, a.length_scale)
            after = cpu_seconds(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    row = bench.summarize(name, samples, wall)
    # cores busy during the run: how close the API process is to needing a second one
    row["cores"] = {k: round((after[k] - before[k]) / wall, 2) for k in after}
    return row


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of `kvgate serve` (the API process) and of its
    children (the engine process), from /proc (Linux; empty elsewhere)."""
    def of(p: int) -> float:
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")   # utime + stime
    try:
        children = [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
        return {"api": of(pid), "engine": sum(of(c) for c in children)}
    except OSError:
        return {}


async def _wait_healthy(session: aiohttp.ClientSession, base: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"kvgate serve exited with {server.returncode}")
        try:
            async with session.get(base.removesuffix("/v1") + "/health") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.5)
    raise RuntimeError("kvgate serve did not become healthy within 600 s")


async def main_async(a: argparse.Namespace) -> list[dict]:
    rows = []
    for name in a.workloads.split(","):
        row = {"workload": name}
        for path in ("in_process", "http"):
            with tempfile.TemporaryDirectory(prefix="kvgate-bench-") as cache:
                os.environ["XDG_CACHE_HOME"] = cache         # an empty cache directory each time
                if path == "in_process":
                    row[path] = await in_process([BENCH_MODEL, *a.overrides], name, a)
                else:
                    row[path] = await over_http([BENCH_MODEL, *a.overrides], name, a, a.port)
        rows.append(row)
    print_table(rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(settings=a.overrides, scale=a.scale, length_scale=a.length_scale, rows=rows), f, indent=1)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'workload':<9} {'path':<11} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9}")
    for r in rows:
        for path in ("in_process", "http"):
            x = r[path]
            print(f"{r['workload']:<9} {path:<11} {x['out_tok_s']:>9} {x['ttft_p50_s'] * 1e3:>7.0f}ms "
                  f"{x['ttft_p99_s'] * 1e3:>7.0f}ms {x['tpot_p50_ms']:>6} ms")
        i, h = r["in_process"], r["http"]
        print(f"{r['workload']:<9} {'http ÷ in':<11} {h['out_tok_s'] / i['out_tok_s']:>9.2f} "
              f"{h['ttft_p50_s'] / i['ttft_p50_s']:>9.2f} {h['ttft_p99_s'] / i['ttft_p99_s']:>9.2f}"
              f"   cores busy over HTTP: {h.get('cores')}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gateway.bench.serving", description=__doc__.split("\n")[0])
    p.add_argument("--workloads", default="gsp,chat")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--length-scale", type=float, default=1.0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--port", type=int, default=8790)
    p.add_argument("--json", default=None)
    asyncio.run(main_async(p.parse_args(argv)))


if __name__ == "__main__":
    main()
