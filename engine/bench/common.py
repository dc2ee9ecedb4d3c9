"""What the engine benchmarks share: the BENCHMARKS.md prompts of the classic workloads, timed
requests, and their summary."""
from __future__ import annotations

import asyncio
import statistics
import time

import torch

from engine.engine import Engine
from engine.sampling import SamplingParams
from store import Tier


def workload(name: str, vocab: int, scale: float, gpu: bool, length: float = 1.0,
             seed: int = 0) -> tuple[list[list[int]], int]:
    g = torch.Generator().manual_seed(seed)
    n = lambda x: max(1, round(x * length))  # noqa: E731
    rand = lambda k: torch.randint(0, vocab, (n(k),), generator=g).tolist()  # noqa: E731
    if name == "gsp":
        groups = max(1, round(8 * scale)) if gpu else 1
        prompts = []
        for _ in range(groups):
            system = rand(2048)
            prompts += [system + rand(128) for _ in range(max(1, round(16 * (scale if not gpu else 1))))]
        return prompts, n(128)
    if name == "unique":
        return [rand(2176) for _ in range(max(1, round(64 * scale)))], n(128)
    if name == "decode1":
        return [rand(2048)], n(128)
    raise ValueError(f"unknown workload {name!r}")


async def run_kvgate(engine: Engine, prompts: list[list[int]], out_len: int) -> dict:
    """All prompts at once; the summary of `summarize`."""
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    results = await asyncio.gather(*(timed_request(engine, p, params) for p in prompts))
    return summarize(results, time.perf_counter() - start)


async def timed_request(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple:
    """(TTFT, arrival time of each token, cached tokens per tier, prompt tokens, tokens, time
    queued before admission)."""
    start, stamps, tokens, last = time.perf_counter(), [], [], None
    async for out in engine.generate(prompt, params):
        stamps += [time.perf_counter()] * len(out.token_ids)
        tokens += out.token_ids
        last = out
    return stamps[0] - start, stamps, last.cached_tokens, last.prompt_tokens, tokens, last.queued_s


def summarize(results: list[tuple], wall: float) -> dict:
    ttft = sorted(r[0] for r in results)
    tpot = [(r[1][-1] - r[1][0]) / (len(r[1]) - 1) for r in results if len(r[1]) > 1]
    out_tokens = sum(len(r[4]) for r in results)
    prompt_tokens = sum(r[3] for r in results)
    cached = {t.name.lower(): sum(r[2][t] for r in results) / prompt_tokens for t in Tier}
    row = dict(requests=len(results), out_tokens=out_tokens, wall_s=round(wall, 3),
               out_tok_s=round(out_tokens / wall, 1), ttft_p50_s=round(percentile(ttft, 50), 4),
               ttft_p99_s=round(percentile(ttft, 99), 4),
               cached_fraction={k: round(v, 3) for k, v in cached.items()})
    if tpot:
        row.update(tpot_p50_ms=round(statistics.median(tpot) * 1e3, 2),
                   decode_tok_s=round(1 / statistics.median(tpot), 1))
    return row


def percentile(sorted_values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of already sorted values."""
    return sorted_values[min(len(sorted_values) - 1, int(round(p / 100 * (len(sorted_values) - 1))))]
