"""kvgate replicas on Ray Serve, three ways: `kvgate bench` workloads (gsp, chat by default)
against N replicas routed by cached prefix, N replicas behind Ray Serve's default router, and
one replica holding the cache of all N — out tok/s, TTFT and the cached fraction of the prompts.

    python -m gateway.bench.replicas [--replicas 2] [--workloads gsp,chat] [--scale 0.5]
        [--length-scale 0.25] [--set section.key=value ...] [--json out.json]

Each run starts `kvgate serve --replicas` (a local Ray) with an empty cache, runs the
workloads, and stops it. `--set` applies to every run; `store.gpu.num_blocks` (if set) is one
replica's pool, and the one-replica run gets N times as many. docs/benchmarks.md, "Replicas".
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile

from gateway.bench import BENCH_MODEL
from gateway.bench import client as bench
from gateway.bench.serving import _wait_healthy


async def run(mode: str, replicas: int, a: argparse.Namespace) -> list[dict]:
    sets = [BENCH_MODEL, *a.overrides]
    if mode == "one replica":
        sets = [_scaled_pool(s, a.replicas) for s in sets]
    sets.append(f"replicas.router={'default' if mode == 'default router' else 'prefix'}")
    server = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", str(a.port), "--replicas",
                               str(replicas), *[arg for s in sets for arg in ("--set", s)], "--log-level", "warning"])
    base = f"http://127.0.0.1:{a.port}/v1"
    try:
        async with bench.session_for_workloads() as session:
            await _wait_healthy(session, base, server)
            client = bench.Client(base, "", None)
            client.session = session
            async with session.get(base + "/models") as resp:
                card = (await resp.json())["data"][0]
            client.model, vocab = card["id"], card.get("vocab_size") or 256
            rows = []
            for name in a.workloads.split(","):
                got, wall = await bench.run_workload(client, name, vocab, a.scale, a.length_scale, a.think_s)
                rows.append({"mode": mode, "replicas": replicas, **bench.summarize(name, got, wall)})
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "rounds"}), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=120)
    return rows


def _scaled_pool(setting: str, n: int) -> str:
    key, _, value = setting.partition("=")
    return f"{key}={int(value) * n}" if key.strip() == "store.gpu.num_blocks" else setting


async def main_async(a: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvgate-bench-") as tmp:
        for mode, n in (("prefix router", a.replicas), ("default router", a.replicas), ("one replica", 1)):
            os.environ["XDG_CACHE_HOME"] = os.path.join(tmp, mode.replace(" ", "-"))   # an empty cache each run
            rows += await run(mode, n, a)
    print(f"\n{'run':<15} {'workload':<9} {'out tok/s':>10} {'per replica':>11} {'TTFT p50':>9} {'TTFT p99':>9}  "
          "cached (per tier)")
    for r in rows:
        cached = " ".join(f"{t} {v:.0%}" for t, v in r["cached_fraction"].items())
        print(f"{r['mode']:<15} {r['workload']:<9} {r['out_tok_s']:>10} {r['out_tok_s'] / r['replicas']:>11.1f} "
              f"{r['ttft_p50_s'] * 1e3:>7.0f}ms {r['ttft_p99_s'] * 1e3:>7.0f}ms  {cached}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(settings=a.overrides, replicas=a.replicas, scale=a.scale, length_scale=a.length_scale,
                           rows=rows), f, indent=1)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gateway.bench.replicas", description=__doc__.split("\n")[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--workloads", default="gsp,chat")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--length-scale", type=float, default=1.0)
    p.add_argument("--think-s", type=float, default=5.0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--port", type=int, default=8792)
    p.add_argument("--json", default=None)
    asyncio.run(main_async(p.parse_args(argv)))


if __name__ == "__main__":
    main()
