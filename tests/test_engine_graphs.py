"""CUDA graphs: which steps run in which graph (the rule, on any machine), and, on CUDA, that
a graphed mixed step (a returning user joining running decodes) gives transformers' tokens, as
the eager step does."""
import os
from collections import Counter

import pytest
import torch

from engine import kernels
from engine.graphs import MAX_CHUNKS, MixedShape, mixed_bucket
from tests.engine_util import collect, greedy, make_engine, prompt
from tests.models import hf_greedy

BUCKETS = (64, 128, 256, 512, 1024)


def test_a_mixed_step_takes_the_smallest_bucket_with_a_padding_row_left():
    assert mixed_bucket(BUCKETS, 128, tokens=80 + 31, decode_rows=31, chunks=1) == 128   # a returning user
    assert mixed_bucket(BUCKETS, 128, tokens=63, decode_rows=0, chunks=1) == 64
    assert mixed_bucket(BUCKETS, 128, tokens=64, decode_rows=0, chunks=1) == 128          # row T-1 is padding
    assert mixed_bucket(BUCKETS, 128, tokens=1023, decode_rows=100, chunks=2) == 1024
    assert mixed_bucket(BUCKETS, 128, tokens=1024, decode_rows=0, chunks=1) is None       # eager


def test_a_mixed_step_beyond_a_graphs_capacities_runs_eagerly():
    # 40 decode rows fit no graph of a 32-sequence engine; the 128 bucket holds 127 of a larger one
    assert mixed_bucket(BUCKETS, 32, tokens=100, decode_rows=40, chunks=1) is None
    assert mixed_bucket(BUCKETS, 256, tokens=120, decode_rows=119, chunks=1) == 128
    assert mixed_bucket(BUCKETS, 128, tokens=100, decode_rows=0, chunks=MAX_CHUNKS) == 128
    assert mixed_bucket(BUCKETS, 128, tokens=100, decode_rows=0, chunks=MAX_CHUNKS + 1) is None


def test_a_mixed_graph_is_sized_for_its_worst_step():
    s = MixedShape.of(128, max_batch=256)
    # every decode row but the padding one; a tile per 64 tokens plus a partial one per chunk
    assert (s.tokens, s.decode, s.tiles, s.samples) == (128, 127, 128 // kernels.PREFILL_TILE + MAX_CHUNKS, 127)
    s = MixedShape.of(512, max_batch=32)
    assert (s.decode, s.samples) == (32, 32 + MAX_CHUNKS)


cuda = pytest.mark.skipif(os.environ.get("KVGATE_TEST_DEVICE") != "cuda" or not kernels.available(torch.device("cuda")),
                          reason="needs KVGATE_TEST_DEVICE=cuda (graphs are captured on CUDA only)")


async def steps_until(engine, done, limit: int = 200) -> None:
    for _ in range(limit):
        if done():
            return
        await engine.step()
    raise AssertionError("the engine did not get there")


@cuda
@pytest.mark.parametrize("graphed", [True, False], ids=["graphed", "eager"])
async def test_a_returning_user_joining_decodes_runs_in_a_mixed_graph_and_matches_generate(llama, graphed):
    engine = make_engine(llama, gpu=128, max_seqs=8, max_batched=64)
    engine.runner.warmup(engine.costs, 64)            # what start() does first: captures every graph
    graphs = engine.runner.graphs
    graphs.broken = not graphed
    idle = lambda: not engine.num_running and not engine.num_waiting  # noqa: E731
    history = prompt(1, 30)
    stream = engine.submit(history, greedy(6))
    await steps_until(engine, idle)
    first, _ = await collect(stream)
    running = [engine.submit(prompt(10 + i, 9 + i), greedy(24)) for i in range(4)]
    seqs = [engine._requests[s.request_id] for s in running]
    await steps_until(engine, lambda: all(s.num_generated for s in seqs))
    before = Counter(graphs.replays)
    follow_up = history + first + prompt(2, 11)       # a prefix hit plus 15 new tokens
    returning = engine.submit(follow_up, greedy(8))
    await engine.step()                               # its new tokens beside four decode rows
    assert graphs.replays - before == (Counter(mixed=1) if graphed else Counter())
    await steps_until(engine, idle)
    tokens, last = await collect(returning)
    assert last.num_cached_tokens == 32
    assert tokens == hf_greedy(llama, follow_up, 8)
    for i, s in enumerate(running):
        assert (await collect(s))[0] == hf_greedy(llama, prompt(10 + i, 9 + i), 24)
    assert graphs.replays["decode"] > 0 if graphed else not graphs.replays
    engine.store.check_integrity()
    await engine.stop()
