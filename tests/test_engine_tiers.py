"""Compute and load at once: a prompt whose cached prefix is on disk computes from the front, at
full speed, up to where it is to meet the read (the meeting point of the measured rates), while
the rest is read from the back; the front skips the blocks read, and the output is still exactly
`transformers.generate`'s. Never worse than the tier off: a slow disk is not read, a late read is
waited for only until it is due, a stalled one not at all. And the "load" mode, which waits."""
import asyncio
import time

import pytest

import store.loader
from engine.request import Request
from engine.sequence import Status
from store import Tier
from tests.engine_util import BS, collect, greedy, make_engine, prompt, run
from tests.models import hf_greedy


async def restarted_with_a_gated_disk(llama, tmp_path, cached: list[int], mode: str = "auto", start=False,
                                      also: tuple[list[int], ...] = (), read_blocks_per_s: float = 250.0):
    """An engine whose disk tier holds `cached` (and `also`, nothing else), with disk reads held at a
    gate until the test opens it. Computing runs at 1000 tokens/s (a block in 4 ms) and a block
    is read in 1 / `read_blocks_per_s` s (by default as fast: a 6-block disk part meets at 3).
    Not started unless `start`: the test runs its steps."""
    disk = str(tmp_path / "kv")
    first = make_engine(llama, gpu=64, host=32, disk=disk, disk_blocks=256)
    await first.start()
    for p in (cached, *also):
        await run(first, p, greedy(1))
    await first.stop()                                # persists it
    engine = make_engine(llama, gpu=64, host=32, disk=disk, disk_blocks=256, max_batched=64)
    engine.costs.mode = mode
    if start:
        await engine.start()
    engine.costs.prefill_tokens_per_s = 1000.0
    engine.store.disk_read_rate = read_blocks_per_s * engine.store.layout.block_bytes
    gate = asyncio.Event()
    real = engine.store.disk.load

    async def gated(items, pool=None, slots=None):
        await gate.wait()
        return await real(items, pool, slots)
    engine.store.disk.load = gated
    return engine, gate


async def settle(engine, seq, until) -> None:
    """Let the engine run (its steps run on a thread) until `until(seq)` holds, for 10 s at most."""
    for _ in range(2000):
        if until(seq):
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"engine did not reach the state: num_computed={seq.num_computed}")


async def read_lands(engine, gate) -> None:
    gate.set()
    await asyncio.gather(*(sl.task for sl in engine.store.loader.sequence_loads()))


async def steps_to_first_token(engine, tokens: list[int]) -> tuple[int, bool, list]:
    """Run `tokens` alone, step by step: the steps until it sampled, whether it read the disk,
    and its output."""
    stream = engine.submit(Request(tokens, greedy(4)))
    seq = engine._requests[stream.request_id]
    read = stream.request_id in engine.store.load_ids()
    steps = 0
    while seq.num_tokens == len(tokens):
        await engine.step()
        steps += 1
        assert steps < 20, "no first token"
    await engine.start()
    return steps, read, await collect(stream)


@pytest.mark.parametrize("mode,first_step,read", [("auto", 12, 12), ("load", 0, 24)])
async def test_the_front_computes_to_the_meeting_point_then_skips_the_blocks_read(llama, tmp_path, mode,
                                                                                   first_step, read):
    document = prompt(1, 24)                          # 6 full blocks, all on disk after the restart
    engine, gate = await restarted_with_a_gated_disk(llama, tmp_path, document, mode)
    follow_up = document + [7, 9]
    assert engine.store.match(engine.store.root_key(), follow_up).tiers == (Tier.DISK,) * 6
    stream = engine.submit(Request(follow_up, greedy(6)))
    seq = engine._requests[stream.request_id]
    await engine.step()                               # admitted; the front computes up to the meeting point
    assert seq.num_computed == first_step and seq.num_tokens == len(follow_up)
    seq.read_due = max(seq.read_due, time.monotonic() + 60)    # slow steps here must not make it late
    await engine.step()                               # the read is not due yet: it waits
    assert seq.num_computed == first_step and engine.scheduler.num_read_waits == 1
    await read_lands(engine, gate)                    # the back arrives ...
    await engine.step()                               # ... is copied in, and the rest computed
    assert seq.num_computed == len(follow_up) and seq.num_tokens == len(follow_up) + 1   # sampled one
    await engine.start()
    tokens, last = await collect(stream)
    assert tokens == hf_greedy(llama, follow_up, 6)
    assert last.cached_tokens[Tier.DISK] == read
    assert engine.recomputed_blocks == ({"disk": (24 - read) // BS} if read < 24 else {})
    assert not engine.store.load_ids() and engine.store.disk.staging.num_free == engine.store.disk.staging.num_blocks
    engine.store.check_integrity()
    await engine.stop()


async def test_a_read_late_at_the_meeting_point_is_waited_for_until_due_then_computed(llama, tmp_path):
    """The front never waits past the read's due time (its predicted arrival, with slack): then
    it computes on through the blocks still being read, and the read is dropped."""
    document = prompt(3, 24)
    engine, gate = await restarted_with_a_gated_disk(llama, tmp_path, document)
    follow_up = document + [7, 9]
    stream = engine.submit(Request(follow_up, greedy(4)))
    seq = engine._requests[stream.request_id]
    assert time.monotonic() < seq.read_due < time.monotonic() + 1.25 * 3 * 0.004 + 0.02
    seq.read_due = time.monotonic() + 60              # not due yet, however slow the steps here
    await engine.step()
    await engine.step()
    assert seq.num_computed == 12                     # at the meeting point, waiting
    seq.read_due = time.monotonic()                   # the read is late
    await engine.step()
    assert seq.num_computed == len(follow_up)         # computed on, in one step
    await read_lands(engine, gate)
    await engine.start()
    tokens, last = await collect(stream)
    assert tokens == hf_greedy(llama, follow_up, 4) and last.cached_tokens[Tier.DISK] == 0
    assert engine.recomputed_blocks == {"disk": 6}
    assert not engine.store.load_ids()
    engine.store.check_integrity()
    await engine.stop()


async def test_a_slow_disk_is_not_read_and_costs_no_step_over_the_tier_off(llama, tmp_path):
    """Reading a block slower than computing it: nothing is read, and the first token takes
    exactly the steps it takes with no disk tier at all."""
    document = prompt(4, 24)
    follow_up = document + [7, 9]
    engine, gate = await restarted_with_a_gated_disk(llama, tmp_path, document, read_blocks_per_s=50.0)
    gate.set()
    steps, read, (tokens, last) = await steps_to_first_token(engine, follow_up)
    off = make_engine(llama, gpu=64, host=32, max_batched=64)
    off_steps, _, (off_tokens, _) = await steps_to_first_token(off, follow_up)
    assert steps == off_steps == 1 and tokens == off_tokens == hf_greedy(llama, follow_up, 4)
    assert not read and last.cached_tokens[Tier.DISK] == 0
    await engine.stop()
    await off.stop()


async def test_a_fast_disk_is_read_whole_and_the_front_computes_only_the_last_tokens(llama, tmp_path):
    document = prompt(5, 24)
    follow_up = document + [7, 9]
    engine, gate = await restarted_with_a_gated_disk(llama, tmp_path, document, read_blocks_per_s=1e6)
    stream = engine.submit(Request(follow_up, greedy(4)))
    seq = engine._requests[stream.request_id]
    await read_lands(engine, gate)
    await engine.step()                               # all 6 blocks read: only 2 tokens computed
    assert seq.num_computed == len(follow_up) and seq.num_tokens == len(follow_up) + 1
    await engine.start()
    tokens, last = await collect(stream)
    assert tokens == hf_greedy(llama, follow_up, 4) and last.cached_tokens[Tier.DISK] == 24
    assert not engine.recomputed_blocks
    await engine.stop()


async def test_a_second_returning_user_plans_behind_the_first_ones_read_and_compute(llama, tmp_path):
    """Two returning users at once (8 ms a block computed or read). The second one's read waits
    behind the 3 blocks the first still means to read (24 ms: its meeting point moves back), and
    its front computes after the first's 14 tokens (28 ms: forward): it meets at block 3 too.
    Without either term it would meet at block 1 or 4."""
    a, b = prompt(7, 24), prompt(8, 24)
    engine, gate = await restarted_with_a_gated_disk(llama, tmp_path, a, also=(b,), read_blocks_per_s=125.0)
    engine.costs.prefill_tokens_per_s = 500.0
    streams = [engine.submit(Request(d + [7, 9], greedy(4))) for d in (a, b)]
    seqs = [engine._requests[s.request_id] for s in streams]
    assert [s.read_tokens for s in seqs] == [12, 12]
    await engine.step()
    assert [s.num_computed for s in seqs] == [12, 12]
    await read_lands(engine, gate)
    await engine.start()
    for d, stream in zip((a, b), streams):
        tokens, last = await collect(stream)
        assert tokens == hf_greedy(llama, d + [7, 9], 4) and last.cached_tokens[Tier.DISK] == 12
    engine.store.check_integrity()
    await engine.stop()


async def test_a_stalled_disk_is_not_waited_for_even_in_load_mode_nor_read_again(llama, tmp_path, monkeypatch):
    monkeypatch.setattr(store.loader, "STALLED_S", 0.0)  # a batch in flight longer than 4x its time
    document, other = prompt(9, 24), prompt(10, 24)
    engine, gate = await restarted_with_a_gated_disk(llama, tmp_path, document, "load", also=(other,),
                                                     read_blocks_per_s=1e9)
    stream = engine.submit(Request(document + [7, 9], greedy(4)))
    seq = engine._requests[stream.request_id]
    await asyncio.sleep(0.01)                         # its read starts, and hangs
    assert engine.store.disk_read_queue()[1]
    await engine.step()
    assert seq.num_computed == len(document) + 2      # computed, not waited for
    second = engine.submit(Request(other + [7, 9], greedy(4)))  # a stalled disk is not read at all
    assert second.request_id not in engine.store.load_ids()
    await read_lands(engine, gate)
    await engine.start()
    assert (await collect(stream))[0] == hf_greedy(llama, document + [7, 9], 4)
    assert (await collect(second))[0] == hf_greedy(llama, other + [7, 9], 4)
    engine.store.check_integrity()
    await engine.stop()


async def test_a_read_that_never_comes_is_computed_and_an_abort_frees_the_load(llama, tmp_path):
    document = prompt(2, 24)
    engine, gate = await restarted_with_a_gated_disk(llama, tmp_path, document, start=True)
    waiting = engine.submit(Request(document + [5], greedy(100)))
    seq = engine._requests[waiting.request_id]
    await settle(engine, seq, lambda s: s.num_computed >= 12)
    waiting.close()                                   # aborted while its read is held
    await settle(engine, seq, lambda s: s.status is Status.FINISHED)
    engine.check_integrity()                          # its read, still in flight, is no request's load
    gate.set()
    for _ in range(2000):                             # the read lands; its slots are freed
        if not engine.store.loader.sequence_loads():
            break
        await asyncio.sleep(0.005)
    assert not engine.store.loader.sequence_loads() and not engine.store.load_ids()
    engine.store.check_integrity()
    assert engine.store.disk.staging.num_free == engine.store.disk.staging.num_blocks
    await engine.stop()
