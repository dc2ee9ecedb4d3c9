"""What a single step costs, for `python -m engine.bench --kernel` and `--profile-step` (see
engine/bench.py): the decode kernel alone, and a decode step and a mixed step (decode plus one
returning user), eagerly and in their CUDA graphs."""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine.bench.common import workload
from engine.config import EngineConfig, ModelConfig
from engine.engine import Engine
from engine.model import load_model
from engine.request import Request
from engine.sampling import SamplingParams
from store import StoreConfig


def bench_kernel(device: str) -> None:
    """The decode kernel alone at the 8B shape: time per layer and achieved KV bandwidth."""
    import triton.testing

    from engine import kernels
    blocks, bs, kvh, hd, heads = 20000, 16, 8, 128, 32
    pool = torch.randn(blocks, 1, 2, bs, kvh, hd, device=device, dtype=torch.bfloat16)
    print(f"\n{'seqs':>5} {'context':>8} {'tile':>5} {'warps':>6} {'stages':>7} {'parts':>6} {'us/layer':>9} "
          f"{'KV GB/s':>8}")
    for seqs, ctx in ((1, 2048), (8, 2048), (64, 2176), (128, 2240)):
        per_seq = -(-ctx // bs)
        tables = torch.randperm(blocks, device=device)[:seqs * per_seq].view(seqs, per_seq).to(torch.int32)
        lens = torch.full((seqs,), ctx, dtype=torch.int32, device=device)
        q = torch.randn(seqs, heads, hd, device=device, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        kv_bytes = seqs * ctx * kvh * hd * 2 * 2
        auto = kernels._partitions(seqs * kvh, per_seq * bs, kernels.TILE, q.device)
        for tile, warps, stages, parts in ((64, 4, 2, 1), (64, 4, 2, auto), (128, 4, 2, auto),
                                           (64, 8, 3, auto), (32, 4, 2, auto)):
            ms = triton.testing.do_bench(lambda: kernels.paged_decode(
                q, pool, 0, tables, lens, hd ** -0.5, out, tile, warps, stages, parts), return_mode="median")
            print(f"{seqs:>5} {ctx:>8} {tile:>5} {warps:>6} {stages:>7} {parts:>6} {ms * 1e3:>9.1f} "
                  f"{kv_bytes / ms / 1e6:>8.0f}")


async def profile_step(a: argparse.Namespace) -> None:
    """Where a step's time goes: the unique workload's prompts (`--scale`) in steady decode
    (schedule / prepare / execute / postprocess of 20 steps), then the same decode batch joined
    by one returning user (a cached context of 1,024 tokens plus
    `--profile-prefill` new ones). Each step's inputs are prepared once and executed again and
    again (it rewrites the same K/V slots), eagerly and in its CUDA graph; then the mixed step
    under torch.profiler (CUDA): the kernels that take its time, and the CPU time of the
    launches."""
    loaded = load_model(ModelConfig(path=a.model, device=a.device, fuse=a.fuse), block_size=a.block_size)
    cuda = loaded.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    config = EngineConfig(max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_batched,
                          block_size=a.block_size)
    engine = Engine(loaded, config, StoreConfig(block_size=a.block_size, gpu_blocks=a.gpu_blocks))
    await engine.start()
    engine._stopping = True          # stop the loop: the steps below are driven by hand
    engine._wakeup.set()
    await engine._loop_task
    engine._loop_task, engine._stopping = None, False

    def step() -> list:
        chunks = engine.scheduler.schedule().chunks
        tokens = engine.runner.execute(engine.runner.prepare(chunks))
        engine.scheduler.advance(chunks)
        engine._postprocess(chunks, tokens, set())
        return chunks
    vocab = loaded.model.config.vocab_size
    prompts, _ = workload("unique", vocab, a.scale, cuda, a.length)
    context = prompts[-1][:1024]
    engine.submit(Request(context, SamplingParams(max_tokens=1, temperature=0.0)))
    while engine.num_running or engine.num_waiting:                  # computed, cached, finished
        step()
    for p in prompts[:-1]:
        engine.submit(Request(p, SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True)))
    while not all(c.num_tokens == 1 for c in step()):                # prefill, then one decode step
        pass
    parts = ("schedule", "prepare", "execute", "postprocess")
    times: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(20):                                               # steady decode, part by part
        stamps = [time.perf_counter()]
        chunks = engine.scheduler.schedule().chunks
        stamps.append(time.perf_counter())
        step_input = engine.runner.prepare(chunks)
        stamps.append(time.perf_counter())
        tokens = engine.runner.execute(step_input)
        sync()
        stamps.append(time.perf_counter())
        engine.scheduler.advance(chunks)
        engine._postprocess(chunks, tokens, set())
        stamps.append(time.perf_counter())
        for k, t0, t1 in zip(parts, stamps, stamps[1:]):
            times[k].append(t1 - t0)
    print(f"\ndecode steps of {len(prompts) - 1} sequences, median ms: " + ", ".join(
        f"{k} {statistics.median(v) * 1e3:.2f}" for k, v in times.items()))
    decode = engine.scheduler.schedule().chunks
    returning = engine.submit(Request(context + torch.randint(0, vocab, (a.profile_prefill,)).tolist(),
                              SamplingParams(max_tokens=1, temperature=0.0)))
    mixed = engine.scheduler.schedule().chunks
    prefill = [c for c in mixed if c.num_tokens > 1]
    assert len(prefill) == 1 and len(mixed) == len(decode) + 1, "the returning user was not scheduled as one chunk"

    def timed(chunks: list, graphs: bool = True, reps: int = 20) -> float:
        step = engine.runner.prepare(chunks)
        broken = engine.runner.graphs.broken if engine.runner.graphs else None
        if engine.runner.graphs:
            engine.runner.graphs.broken = not graphs
        times = []
        for _ in range(reps + 2):
            sync()
            t0 = time.perf_counter()
            engine.runner.execute(step)
            sync()
            times.append(time.perf_counter() - t0)
        if engine.runner.graphs:
            engine.runner.graphs.broken = broken
        return statistics.median(times[2:]) * 1e3

    ctx = prefill[0].start
    print(f"steps of {len(decode)} decoding sequences (contexts {decode[0].start}) and one returning user "
          f"({ctx} cached + {prefill[0].num_tokens} new tokens), median of 20 executions, ms:")
    for name, chunks in (("decode", decode), ("decode + returning user", mixed), ("returning user alone", prefill)):
        graph = engine.runner.graphs.choose(engine.runner.prepare(chunks)) if engine.runner.graphs else None
        print(f"  {name:<26} eager {timed(chunks, False):8.2f}   graph {graph and '%s %d' % graph or '-':>12} "
              f"{timed(chunks, True) if graph else float('nan'):8.2f}")
    if cuda:
        from torch.profiler import ProfilerActivity, profile
        step = engine.runner.prepare(mixed)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                engine.runner.execute(step)
            sync()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    returning.close()
    engine._stopping = False
    await engine.stop(persist=False)
