"""The cache-tier workloads of BENCHMARKS.md, in process (`python -m engine.bench`):

  chat           U users, each a 1024-token private context; 8 rounds of +64 user tokens and
                 128 generated tokens that join the history; users run concurrently
  chat-overflow  chat with the GPU pool capped at a fifth of the conversations' final KV, run
                 GPU-only, GPU + host, and GPU + host + disk (the host then as small as the GPU),
                 the last with `load_or_recompute` = "auto" and "load"
  restart        compute the gsp group prefixes, stop (the cache is persisted), start a new
                 engine on the same disk directory and send one new request per group; beside
                 a cold engine, and with `load_or_recompute` = "load" and "auto"
  chat-think     chat users who think between turns (seeded exponential think time, mean
                 `think_s`; first turns spread over one think period), the GPU pool a quarter of
                 all histories; run GPU-only, + host, small host + disk, host + disk
  chat-think-long  the same users with long histories: 24 users of 6,000-token contexts, 4 rounds
                 of +128 user tokens and 64 generated, think 6 s, a 4,096-block GPU pool (scaled
                 with the users); run GPU-only, default tiers, a small host tier (1,024 blocks)
                 without disk and the same with disk: the last two side by side give the disk
                 tier's own effect

Each reports throughput, TTFT (p50, p99; per round for chat) and the cached fraction of
prompt tokens per tier.
"""
from __future__ import annotations

import asyncio
import bisect
import math
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from engine.bench.common import percentile, run_kvgate, summarize, timed_request
from engine.engine import Engine
from engine.sampling import SamplingParams
from store import Tier

# (gpu_blocks, host_blocks, disk_path, load_or_recompute) -> a started engine
EngineFactory = Callable[..., Awaitable[Engine]]

CONTEXT, TURN, ANSWER, ROUNDS = 1024, 64, 128, 8


@dataclass(frozen=True)
class ChatShape:
    """A multi-turn chat workload: each user's private context, then `rounds` of `turn` user
    tokens and `answer` generated ones that join the history."""
    context: int = CONTEXT
    turn: int = TURN
    answer: int = ANSWER
    rounds: int = ROUNDS
    users: int = 64               # at scale 1
    gpu_blocks: int = 0           # at scale 1; 0 = a quarter of all histories
    small_host_blocks: int = 0    # at scale 1; 0 = half the GPU pool
    think_s: float = 5.0          # mean think time between a user's turns
    configs: str = "gpu,host,small-host+disk,host+disk"   # the tier configurations run by default


# the chat-think workloads of BENCHMARKS.md, by name (engine.bench in process, kvgate bench over HTTP)
THINK_SHAPES = {
    "chat-think": ChatShape(),
    "chat-think-long": ChatShape(context=6000, turn=128, answer=64, rounds=4, users=24, gpu_blocks=4096,
                                 small_host_blocks=1024, think_s=6.0,
                                 configs="gpu,host+disk,small-host,small-host+disk"),
}


async def chat(engine: Engine, vocab: int, users: int, length: float = 1.0, seed: int = 0) -> dict:
    """U concurrent users, 8 rounds each; a summary with a `rounds` list."""
    n = lambda x: max(1, round(x * length))  # noqa: E731
    params = SamplingParams(max_tokens=n(ANSWER), temperature=0.0, ignore_eos=True)

    async def user(u: int) -> list[tuple[int, tuple]]:
        rng = random.Random(f"chat-{seed}-{u}")
        history = [rng.randrange(vocab) for _ in range(n(CONTEXT))]
        turns = []
        for r in range(1, ROUNDS + 1):
            history += [rng.randrange(vocab) for _ in range(n(TURN))]
            result = await timed_request(engine, history, params)
            history += result[4]                           # the answer joins the history
            turns.append((r, result))
        return turns

    start = time.perf_counter()
    turns = [t for per_user in await asyncio.gather(*(user(u) for u in range(users))) for t in per_user]
    wall = time.perf_counter() - start
    row = summarize([t[1] for t in turns], wall)
    row["rounds"] = []
    for r in range(1, ROUNDS + 1):
        of_round = summarize([t[1] for t in turns if t[0] == r], wall)
        row["rounds"].append({k: of_round[k] for k in ("ttft_p50_s", "ttft_p99_s", "cached_fraction")})
        row["rounds"][-1]["round"] = r
    return row


async def chat_overflow(factory: EngineFactory, vocab: int, users: int, block_size: int,
                        length: float = 1.0) -> list[dict]:
    """chat three times on a GPU pool a fifth of the total KV: GPU only, + host, + host + disk."""
    final = round(CONTEXT * length) + ROUNDS * (round(TURN * length) + round(ANSWER * length))
    per_user = math.ceil(final / block_size)
    total = users * per_user
    gpu = max(total // 5, 2 * per_user)
    rows = []
    disk = tempfile.mkdtemp(prefix="kvgate-bench-")
    try:
        for config, host, disk_path, mode in (("gpu", 0, "", "auto"), ("gpu+host", total + gpu, "", "auto"),
                                              ("gpu+host+disk", gpu, disk, "auto"),
                                              ("gpu+host+disk, load", gpu, disk + "-load", "load")):
            engine = await factory(gpu_blocks=gpu, host_blocks=host, disk_path=disk_path,
                                   load_or_recompute=mode)
            row = await chat(engine, vocab, users, length)
            stats = engine.store.stats()
            row.update(config=config, gpu_blocks=gpu, host_blocks=host, conversation_blocks=total,
                       disk_loaded_blocks=stats.tiers[Tier.DISK].promotions,
                       disk_writes_dropped=stats.disk.pending_full if stats.disk else 0, **_counts(engine))
            await engine.stop(persist=False)
            del engine              # unreferenced, so that the factory frees its pools before the next
            rows.append(row)
    finally:
        shutil.rmtree(disk, ignore_errors=True)
        shutil.rmtree(disk + "-load", ignore_errors=True)
    return rows


async def restart(factory: EngineFactory, vocab: int, groups: int, gpu_blocks: int,
                  length: float = 1.0) -> list[dict]:
    """One request per gsp group after a restart on the cache's disk directory."""
    rng = random.Random("restart")
    n = lambda x: max(1, round(x * length))  # noqa: E731
    rand = lambda k: [rng.randrange(vocab) for _ in range(k)]  # noqa: E731
    prefixes = [rand(n(2048)) for _ in range(groups)]
    requests = {name: [p + rand(n(128)) for p in prefixes] for name in ("first", "cold", "load", "auto")}
    host = groups * math.ceil(n(2176 + 128) / 16) + 64      # room to stage every prefix
    disk = tempfile.mkdtemp(prefix="kvgate-bench-")
    rows = []
    try:
        engine = await factory(gpu_blocks=gpu_blocks, host_blocks=host)
        rows.append(dict(config="cold", **await run_kvgate(engine, requests["cold"], n(128))))
        await engine.stop(persist=False)
        del engine                  # unreferenced, so that the factory frees its pools before the next
        engine = await factory(gpu_blocks=gpu_blocks, host_blocks=host, disk_path=disk)
        await run_kvgate(engine, requests["first"], 1)      # computes the group prefixes
        await engine.stop()                                 # ...and writes them to disk
        del engine
        for mode in ("load", "auto"):
            start = time.perf_counter()
            engine = await factory(gpu_blocks=gpu_blocks, host_blocks=host, disk_path=disk,
                                   load_or_recompute=mode)
            started = time.perf_counter() - start
            row = await run_kvgate(engine, requests[mode], n(128))
            rows.append(dict(config=f"restarted, {mode}", startup_s=round(started, 2),
                             hits_recomputed=sum(engine.recomputed_blocks.values()), **row))
            await engine.stop(persist=False)
            del engine
    finally:
        shutil.rmtree(disk, ignore_errors=True)
    return rows


async def chat_think(factory: EngineFactory, vocab: int, scale: float, block_size: int, length: float = 1.0,
                     think_s: float = 5.0, seed: int = 0, configs: str = "gpu,host,small-host+disk,host+disk",
                     shape: ChatShape = THINK_SHAPES["chat-think"], repeat: int = 1) -> list[dict]:
    """One row per tier configuration (and per repeat: `run`): TTFT p50/p90 of rounds >= 2 (and
    of each round), queue time, throughput, cached fraction per tier, preemptions, disk writes
    and hits recomputed. Configurations: gpu, host (holding everything), small-host (no disk),
    small-host+disk, host+disk (the default tiers: a host tier holding everything, and a disk);
    "/load" after one sets its load_or_recompute mode."""
    n = lambda x: max(1, round(x * length))  # noqa: E731
    users = max(2, round(shape.users * scale))
    per_user = math.ceil((n(shape.context) + shape.rounds * (n(shape.turn) + n(shape.answer))) / block_size)
    total = users * per_user
    gpu = max(round(shape.gpu_blocks * users / shape.users) if shape.gpu_blocks else total // 4, 2 * per_user)
    small = round(shape.small_host_blocks * users / shape.users) if shape.small_host_blocks else gpu // 2
    sizes = {"gpu": (0, False), "host": (total + gpu, False), "small-host": (small, False),
             "small-host+disk": (small, True), "host+disk": (total + gpu, True)}
    rows = []
    for run in range(repeat):
        for config in configs.split(","):
            tiers, _, mode = config.partition("/")      # "small-host+disk/load": that load_or_recompute mode
            host, with_disk = sizes[tiers]
            disk = tempfile.mkdtemp(prefix="kvgate-bench-") if with_disk else ""
            try:
                engine = await factory(gpu_blocks=gpu, host_blocks=host, disk_path=disk,
                                       load_or_recompute=mode or "auto")
                trace = _time_schedule(engine)
                cpu = time.thread_time()       # the event loop thread's CPU time: all it did
                row, first_tokens = await _think_users(engine, vocab, users, n, think_s, seed, shape)
                row.update(schedule_s=round(trace["schedule"], 3), steps=trace["steps"],
                           loop_cpu_s=round(time.thread_time() - cpu, 3),
                           **_first_token_steps(trace["forwards"], first_tokens))
                row.update(config=config, run=run, gpu_blocks=gpu, host_blocks=host, conversation_blocks=total,
                           **_counts(engine))
                await engine.stop(persist=False)
                del engine          # unreferenced, so that the factory frees its pools before the next
            finally:
                if disk:
                    shutil.rmtree(disk, ignore_errors=True)
            rows.append(row)
    return rows


def _counts(engine: Engine) -> dict:
    """What a tier configuration's run cost, from the engine's running totals."""
    stats = engine.store.stats()
    return dict(preemptions=engine.scheduler.num_preemptions,
                hits_recomputed=sum(engine.recomputed_blocks.values()),
                disk_writes=stats.disk.writes if stats.disk else 0,
                disk_writes_skipped=dict(stats.writes_skipped, queue_full=stats.disk.pending_full,
                                         paused=stats.disk.writes_paused) if stats.disk else {},
                overload=stats.overload, admissions_blocked=engine.scheduler.num_blocked_admissions,
                read_waits=engine.scheduler.num_read_waits,
                steps_by_run=dict(engine.runner.steps))


def _time_schedule(engine: Engine) -> dict:
    """A trace of the run: seconds the event loop spends in `Scheduler.schedule` (admission,
    promotions, evictions, disk write queueing), and every forward pass as (start, end, prompt
    tokens computed, sequences) — to see what a request's first token waited for. A pass ends
    when its tokens are read back, and starts its device time before that."""
    spent = {"schedule": 0.0, "steps": 0, "forwards": []}
    schedule, complete = engine.scheduler.schedule, engine._complete

    def timed():
        start = time.perf_counter()
        try:
            return schedule()
        finally:
            spent["schedule"] += time.perf_counter() - start
            spent["steps"] += 1

    async def timed_complete(step):
        try:
            return await complete(step)
        finally:
            end = time.perf_counter()
            seconds = step.launched.seconds if step.launched and step.launched.seconds is not None else 0.0
            spent["forwards"].append((end - seconds, end, sum(c.num_tokens for c in step.chunks if c.num_tokens > 1),
                                      len(step.chunks)))
    engine.scheduler.schedule = timed
    engine._complete = timed_complete
    return spent


def _first_token_steps(forwards: list[tuple], first_tokens: list[float]) -> dict:
    """For each first token, the forward pass that produced it (the last one ending before it):
    median duration and prompt tokens of those passes, against all passes."""
    ends = [f[1] for f in forwards]
    picked = [forwards[bisect.bisect_right(ends, t) - 1] for t in first_tokens if bisect.bisect_right(ends, t)]
    med = lambda xs: statistics.median(xs) if xs else 0.0  # noqa: E731
    return dict(first_token_step_ms=round(med([(f[1] - f[0]) * 1e3 for f in picked]), 1),
                first_token_step_prefill=round(med([f[2] for f in picked])),
                step_ms_p50=round(med([(f[1] - f[0]) * 1e3 for f in forwards]), 1))


async def _think_users(engine: Engine, vocab: int, users: int, n, think_s: float, seed: int,
                       shape: ChatShape) -> dict:
    params = SamplingParams(max_tokens=n(shape.answer), temperature=0.0, ignore_eos=True)
    first_tokens: list[float] = []     # when each first token of rounds >= 2 arrived

    async def user(u: int) -> list[tuple[int, tuple]]:
        rng = random.Random(f"chat-think-{seed}-{u}")
        history = [rng.randrange(vocab) for _ in range(n(shape.context))]
        await asyncio.sleep(rng.uniform(0, think_s))             # arrivals spread over one period
        turns = []
        for r in range(1, shape.rounds + 1):
            history += [rng.randrange(vocab) for _ in range(n(shape.turn))]
            result = await timed_request(engine, history, params)
            turns.append((r, result))
            if r >= 2:
                first_tokens.append(result[1][0])
            history += result[4]
            await asyncio.sleep(rng.expovariate(1 / think_s) if think_s > 0 else 0)
        return turns

    start = time.perf_counter()
    turns = [t for per_user in await asyncio.gather(*(user(u) for u in range(users))) for t in per_user]
    row = summarize([t[1] for t in turns], time.perf_counter() - start)
    later = sorted(t[1][0] for t in turns if t[0] >= 2)
    queued = sorted(t[1][5] for t in turns if t[0] >= 2)
    row.update(ttft_later_p50_s=round(percentile(later, 50), 4), ttft_later_p90_s=round(percentile(later, 90), 4),
               queue_later_p50_s=round(percentile(queued, 50), 4), think_s=think_s, rounds=[])
    for r in range(1, shape.rounds + 1):
        of_round = summarize([t[1] for t in turns if t[0] == r], 1.0)
        row["rounds"].append(dict(round=r, ttft_p50_s=of_round["ttft_p50_s"],
                                  cached_fraction=of_round["cached_fraction"]))
    return row, sorted(first_tokens)
