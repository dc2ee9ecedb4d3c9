"""Fair share between tenants, measured over HTTP: a light tenant's first tokens alone, and
beside a heavy tenant's flood.

    python -m gateway.bench.tenants [--flood 200] [--flood-tokens 128] [--light 6] [--gap 0.4] \\
        [--heavy-kv-share 1.0] [--set section.key=value ...] [--json out.json]

Three runs, each on a fresh `kvgate serve` with two tenants and an empty cache directory:
  alone       the light tenant alone: a system prompt sent once, then `--light` short requests
              behind it, `--gap` s apart;
  flood       the heavy tenant's `--flood` requests of `--flood-tokens` tokens, sent at once, and
              then the light tenant's requests as above;
  one tenant  the same, both sending with the light tenant's key: no fair share between them
              (the baseline: one queue in arrival order).
For each: the light tenant's TTFT p50 / p99 and the cached share of its prompts (during the
runs, and of one more request once the flood is done: did its prefix survive?), and the heavy
tenant's out tok/s and how long its flood took. `--heavy-kv-share` sets the heavy tenant's
`max_kv_share`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import aiohttp

from gateway.bench import BENCH_MODEL
from gateway.bench import client as bench
from gateway.bench.serving import _wait_healthy

TENANTS = """
[server]
admin_api_key = "bench-admin"

[[tenants]]
name = "light"
api_key = "bench-light"

[[tenants]]
name = "heavy"
api_key = "bench-heavy"
"""
SYSTEM = [3 + (7 * i) % 240 for i in range(96)]      # the light tenant's shared prefix, as token ids


async def stream(session: aiohttp.ClientSession, base: str, model: str, key: str, prompt: list[int],
                 max_tokens: int) -> dict:
    """One streamed completion of token ids (any model, a tokenizer or not): its TTFT, output
    tokens and cached prompt tokens."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    start = time.perf_counter()
    first, usage = None, None
    async with session.post(base + "/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif first is None and chunk["choices"] and chunk["choices"][0].get("token_ids"):
                first = time.perf_counter()
    return {"ttft_s": (first or time.perf_counter()) - start, "completion_tokens": usage["completion_tokens"],
            "prompt_tokens": usage["prompt_tokens"], "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]}


async def light_requests(session, base: str, model: str, key: str, n: int, gap: float) -> list[dict]:
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(stream(session, base, model, key, SYSTEM + [200 + i, 201, 202], 8)))
        await asyncio.sleep(gap)
    return await asyncio.gather(*tasks)


async def run(mode: str, a: argparse.Namespace, config: str) -> dict:
    sets = [arg for o in (BENCH_MODEL, *a.overrides) for arg in ("--set", o)]
    server = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", config, "--port", str(a.port),
                               *sets, "--log-level", "warning"])
    base = f"http://127.0.0.1:{a.port}/v1"
    light_key, heavy_key = "bench-light", ("bench-light" if mode == "one tenant" else "bench-heavy")
    try:
        async with bench.session_for_workloads() as session:
            await _wait_healthy(session, base, server)
            async with session.get(base + "/models", headers={"Authorization": f"Bearer {light_key}"}) as resp:
                model = (await resp.json())["data"][0]["id"]
            await stream(session, base, model, light_key, SYSTEM + [9], 4)      # the light tenant's prefix, cached
            flood, started = [], time.perf_counter()
            if mode != "alone":
                flood = [asyncio.create_task(stream(session, base, model, heavy_key,
                                                    [3 + (i * 13 + j) % 240 for j in range(64)], a.flood_tokens))
                         for i in range(a.flood)]
                await asyncio.sleep(a.gap)                                # the flood is queued
            light = await light_requests(session, base, model, light_key, a.light, a.gap)
            heavy = await asyncio.gather(*flood)
            flood_s = time.perf_counter() - started
            # the light tenant comes back after the flood: is its prefix still cached?
            back = await stream(session, base, model, light_key, SYSTEM + [250, 251], 4)
    finally:
        server.terminate()
        server.wait(timeout=120)
    ttfts = sorted(r["ttft_s"] for r in light)
    cached = sum(r["cached_tokens"] for r in light) / sum(r["prompt_tokens"] for r in light)
    row = {"mode": mode, "light_ttft_p50_s": round(statistics.median(ttfts), 4),
           "light_ttft_p99_s": round(ttfts[-1], 4), "light_cached": round(cached, 3),
           "light_cached_after": round(back["cached_tokens"] / back["prompt_tokens"], 3)}
    if heavy:
        row |= {"heavy_out_tok_s": round(sum(r["completion_tokens"] for r in heavy) / flood_s, 1),
                "flood_s": round(flood_s, 1)}
    return row


async def main_async(a: argparse.Namespace) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvgate-bench-") as tmp:
        config = os.path.join(tmp, "tenants.toml")
        with open(config, "w") as f:
            f.write(TENANTS + f"max_kv_share = {a.heavy_kv_share}\n")
        for mode in ("alone", "flood", "one tenant"):
            os.environ["XDG_CACHE_HOME"] = os.path.join(tmp, mode.replace(" ", "-"))   # an empty cache each run
            rows.append(await run(mode, a, config))
            print(json.dumps(rows[-1]), flush=True)
    alone = rows[0]["light_ttft_p50_s"]
    print(f"\n{'run':<11} {'light TTFT p50':>14} {'÷ alone':>8} {'p99':>8} {'cached':>7} {'after':>6} "
          f"{'heavy tok/s':>11} {'flood':>7}")
    for r in rows:
        print(f"{r['mode']:<11} {r['light_ttft_p50_s'] * 1e3:>12.0f}ms {r['light_ttft_p50_s'] / alone:>8.2f} "
              f"{r['light_ttft_p99_s'] * 1e3:>6.0f}ms {r['light_cached']:>7.0%} {r['light_cached_after']:>6.0%} "
              f"{r.get('heavy_out_tok_s', '-'):>11} "
              f"{r.get('flood_s', '-'):>6}s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(settings=a.overrides, flood=a.flood, flood_tokens=a.flood_tokens, light=a.light,
                           gap=a.gap, heavy_kv_share=a.heavy_kv_share, rows=rows), f, indent=1)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m gateway.bench.tenants", description=__doc__.split("\n")[0])
    p.add_argument("--flood", type=int, default=200, help="the heavy tenant's requests, sent at once")
    p.add_argument("--flood-tokens", type=int, default=128, help="output tokens of each")
    p.add_argument("--light", type=int, default=6, help="the light tenant's requests")
    p.add_argument("--gap", type=float, default=0.4, help="seconds between the light tenant's requests")
    p.add_argument("--heavy-kv-share", type=float, default=1.0,
                   help="the heavy tenant's max_kv_share (its cached blocks above it are evicted first)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--port", type=int, default=8791)
    p.add_argument("--json", default=None)
    asyncio.run(main_async(p.parse_args(argv)))


if __name__ == "__main__":
    main()
