"""Compute and load at once: a prompt whose cached prefix is on disk computes its share of it
from the front while the rest is read from the back; the two meet, the blocks read are copied
in, and the output is still exactly `transformers.generate`'s. And the "load" mode, which waits."""
import asyncio

import pytest

from engine.sequence import Status
from store import Tier
from tests.engine_util import BS, collect, greedy, make_engine, prompt, run
from tests.models import hf_greedy


async def restarted_with_a_gated_disk(llama, tmp_path, cached: list[int], mode: str = "auto", start=False,
                                      also: tuple[list[int], ...] = ()):
    """An engine whose disk tier holds `cached` (and `also`, nothing else), with disk reads held at a
    gate until the test opens it, and rates that make computing and reading equally fast
    (the front's share is 1/2). Not started unless `start`: the test runs its steps."""
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
    engine.costs.prefill_tokens_per_s = 1000.0        # tokens/s; a block's KV is read as fast:
    engine.store.disk_read_rate = 1000.0 * engine.store.layout.block_bytes / BS   # share 1/2
    gate = asyncio.Event()
    real = engine.store.disk.load

    async def gated(items, sink):
        await gate.wait()
        return await real(items, sink)
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


@pytest.mark.parametrize("mode,first_step,read", [("auto", 12, 12), ("load", 0, 24)])
async def test_the_front_computes_its_share_then_takes_the_blocks_read(llama, tmp_path, mode, first_step, read):
    document = prompt(1, 24)                          # 6 full blocks, all on disk after the restart
    engine, gate = await restarted_with_a_gated_disk(llama, tmp_path, document, mode)
    follow_up = document + [7, 9]
    assert engine.store.match(engine.store.root_key(), follow_up).tiers == (Tier.DISK,) * 6
    stream = engine.submit(follow_up, greedy(6))
    seq = engine._requests[stream.request_id]
    await engine.step()                               # admitted; the front computes its share
    assert seq.num_computed == first_step and seq.num_tokens == len(follow_up)
    await read_lands(engine, gate)                    # the back arrives ...
    await engine.step()                               # ... is copied in, and the rest computed
    assert seq.num_computed == len(follow_up) and seq.num_tokens == len(follow_up) + 1   # sampled one
    await engine.start()
    tokens, last = await collect(stream)
    assert tokens == hf_greedy(llama, follow_up, 6)
    assert last.cached_tokens[Tier.DISK] == read
    assert engine.costs.recomputed_blocks[Tier.DISK] == (24 - read) // BS
    assert not engine.store.load_ids()
    engine.store.check_integrity()
    await engine.stop()


async def test_the_front_waits_for_its_read_while_computing_would_delay_another_sequence(llama, tmp_path):
    """Computing as fast as reading: half the gap computed saves the sequence what it costs one
    other sequence in the step. With another one running, the front computes none of the disk
    part: it waits for the read, and nothing is recomputed."""
    document = prompt(5, 24)
    engine, gate = await restarted_with_a_gated_disk(llama, tmp_path, document)
    other = engine.submit(prompt(6, 5), greedy(8))
    await engine.step()                               # the other one computes, and keeps decoding
    follow_up = document + [7, 9]
    stream = engine.submit(follow_up, greedy(4))
    seq = engine._requests[stream.request_id]
    await engine.step()
    assert seq.num_computed == 0 and len(engine.scheduler.running) == 2
    await read_lands(engine, gate)
    await engine.step()                               # all 24 read, copied in; 2 tokens computed
    assert seq.num_computed == len(follow_up) and seq.num_tokens == len(follow_up) + 1   # sampled one
    await engine.start()
    tokens, last = await collect(stream)
    assert tokens == hf_greedy(llama, follow_up, 4) and last.cached_tokens[Tier.DISK] == 24
    assert engine.costs.recomputed_blocks[Tier.DISK] == 0
    assert (await collect(other))[0] == hf_greedy(llama, prompt(6, 5), 8)
    engine.store.check_integrity()
    await engine.stop()


async def test_sequences_waiting_for_their_own_reads_do_not_stop_each_other_computing(llama, tmp_path):
    """Two returning users with their histories on disk and nothing else running: neither one's
    front delays a sequence that computes (the other only waits for its read), so each front
    computes its share, half the gap, in the first step."""
    a, b = prompt(7, 24), prompt(8, 24)
    engine, gate = await restarted_with_a_gated_disk(llama, tmp_path, a, also=(b,))
    streams = [engine.submit(d + [7, 9], greedy(4)) for d in (a, b)]
    seqs = [engine._requests[s.request_id] for s in streams]
    await engine.step()
    assert [s.num_computed for s in seqs] == [12, 12]
    await read_lands(engine, gate)
    await engine.start()
    for d, stream in zip((a, b), streams):
        tokens, last = await collect(stream)
        assert tokens == hf_greedy(llama, d + [7, 9], 4) and last.cached_tokens[Tier.DISK] == 12
    engine.store.check_integrity()
    await engine.stop()


async def test_the_front_never_idles_behind_a_read_that_does_not_come(llama, tmp_path):
    """Each step the front takes half of the gap left (the share), so a stalled read costs a few
    steps, never a wait: 24 cached tokens are computed in 12, 6, 3, 2, 1."""
    document = prompt(3, 24)
    engine, gate = await restarted_with_a_gated_disk(llama, tmp_path, document)
    follow_up = document + [7, 9]
    stream = engine.submit(follow_up, greedy(4))
    seq = engine._requests[stream.request_id]
    computed = []
    for _ in range(8):                                # bounded: a front that idles fails here
        await engine.step()
        computed.append(seq.num_computed)
        if seq.num_tokens > len(follow_up):          # it has sampled (read back or in flight)
            break
    assert computed == [12, 18, 21, 23, 24, 26]
    assert engine.costs.recomputed_blocks[Tier.DISK] == 6          # the front passed the end: dropped
    await read_lands(engine, gate)
    await engine.start()
    tokens, last = await collect(stream)
    assert tokens == hf_greedy(llama, follow_up, 4) and last.cached_tokens[Tier.DISK] == 0
    assert engine.costs.recomputed_blocks[Tier.DISK] == 6
    assert not engine.store.load_ids()
    engine.store.check_integrity()
    await engine.stop()


async def test_a_read_that_never_comes_is_computed_and_an_abort_frees_the_load(llama, tmp_path):
    document = prompt(2, 24)
    engine, gate = await restarted_with_a_gated_disk(llama, tmp_path, document, start=True)
    waiting = engine.submit(document + [5], greedy(100))
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
    assert engine.store.stats().tiers[Tier.HOST].locked == 0
    await engine.stop()
