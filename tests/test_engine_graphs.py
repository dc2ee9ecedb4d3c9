"""CUDA graphs: which steps run in which graph (the rule, on any machine), and, on CUDA, that
a graphed mixed step (a returning user joining running decodes) gives transformers' tokens, as
the eager step does."""
import os
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from engine import kernels
from engine.attention import DecodeBatch, PrefillBatch
from engine.graphs import MAX_CHUNKS, MixedShape, StepGraphs, mixed_bucket, padded_mixed_inputs
from engine.request import Request
from engine.runner import StepInput
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


def test_a_mixed_step_is_padded_so_that_padding_touches_no_real_row_or_block():
    """Decode rows A, B, C around a 70-token prompt chunk (30 tokens cached): 73 tokens, the
    128-token graph. Every padding token writes into the scratch block, every padding decode
    row has context 0 and lands on row 127, every padding tile points at the empty chunk."""
    t = lambda xs, dtype=torch.long: torch.tensor(xs, dtype=dtype)  # noqa: E731
    i32 = torch.int32
    n, scratch = 73, 999
    step = StepInput(
        input_ids=torch.arange(100, 100 + n), positions=torch.arange(n), slot_block=torch.full((n,), 5),
        slot_offset=torch.arange(n) % 4, seqs=(),
        decode=DecodeBatch(t([0, 71, 72]), t([[1, 2], [3, 0], [4, 0]], i32), t([7, 2, 3], i32)),
        prefill=PrefillBatch(t([[0, 0], [0, 64]], i32), t([[1, 70, 100]], i32), t([[6, 7, 8]], i32)),
        sample_rows=t([0, 70, 71, 72]), params=[], generators=[])
    assert mixed_bucket(BUCKETS, 16, n, 3, 1) == 128
    shape = MixedShape.of(128, max_batch=16)
    got = padded_mixed_inputs(step, shape, scratch)
    assert got["input_ids"].tolist() == list(range(100, 173)) + [0] * 55
    assert got["slot_block"].tolist() == [5] * n + [scratch] * 55            # never a real block
    assert got["decode_rows"].tolist() == [0, 71, 72] + [127] * 13          # shape.decode = 16
    assert got["lens"].tolist() == [7, 2, 3] + [0] * 13
    assert got["tiles"].tolist() == [[0, 0], [0, 64]] + [[MAX_CHUNKS, 0]] * 8
    assert got["sample_rows"].tolist() == [0, 70, 71, 72] + [127] * 20      # in the step's order
    assert got["chunks"].tolist() == [[1, 70, 100]] and got["tables"].shape == (3, 2)
    # copied into static buffers of the graph's full sizes (stale values elsewhere stay)
    bufs = SimpleNamespace(**{k: torch.full((200, 9) if v.dim() == 2 else (200,), -1, dtype=v.dtype)
                              for k, v in got.items()})
    StepGraphs._copy_in(bufs, got)
    assert bufs.slot_block[:128].tolist() == got["slot_block"].tolist() and bufs.slot_block[128] == -1
    assert bufs.tables[:3, :2].tolist() == [[1, 2], [3, 0], [4, 0]] and bufs.tables[0, 2] == -1
    assert bufs.chunk_tables[0, :3].tolist() == [6, 7, 8] and bufs.tiles[:10, :2].tolist() == got["tiles"].tolist()


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
    stream = engine.submit(Request(history, greedy(6)))
    await steps_until(engine, idle)
    first, _ = await collect(stream)
    running = [engine.submit(Request(prompt(10 + i, 9 + i), greedy(24))) for i in range(4)]
    seqs = [engine._requests[s.request_id] for s in running]
    await steps_until(engine, lambda: all(s.num_generated for s in seqs))
    before = Counter(engine.runner.steps)
    follow_up = history + first + prompt(2, 11)       # a prefix hit plus 15 new tokens
    returning = engine.submit(Request(follow_up, greedy(8)))
    await engine.step()                               # its new tokens beside four decode rows
    assert engine.runner.steps - before == (Counter(mixed=1) if graphed else Counter(eager=1))
    await steps_until(engine, idle)
    tokens, last = await collect(returning)
    assert last.num_cached_tokens == 32
    assert tokens == hf_greedy(llama, follow_up, 8)
    for i, s in enumerate(running):
        assert (await collect(s))[0] == hf_greedy(llama, prompt(10 + i, 9 + i), 24)
    assert (engine.runner.steps["decode"] > 0) if graphed else (set(engine.runner.steps) == {"eager"})
    engine.store.check_integrity()
    await engine.stop()
