"""Greedy output, fp32 on the CPU, is token-for-token what `transformers.generate` produces: for
a miss, for hits from each tier (GPU, host, disk, after a restart), for preempted-and-resumed
sequences, and with many concurrent requests of different lengths."""
import asyncio
import random

import pytest

from engine.request import Request
from store import Tier
from tests.engine_util import BS, collect, greedy, make_engine, prompt, run
from tests.models import ARCHS, build_model_dir, hf_greedy


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "transformers-layers"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
async def test_concurrent_misses_match_generate(model_root, arch, fused):
    path = build_model_dir(model_root, arch)
    engine = make_engine(path, max_batched=16, fused=fused)      # long prompts are prefilled in chunks
    await engine.start()
    prompts = [prompt(1, 5), prompt(2, 17), prompt(3, 33)]
    results = await asyncio.gather(*(run(engine, p, greedy(12)) for p in prompts))
    for p, (tokens, last) in zip(prompts, results):
        assert tokens == hf_greedy(path, p, 12)
        assert last.finish_reason == "length" and last.num_cached_tokens == 0
    await engine.stop()


async def test_gpu_hit_matches_generate(llama):
    engine = make_engine(llama)
    await engine.start()
    first = prompt(1, 22)
    tokens, _ = await run(engine, first, greedy(10))
    follow_up = first + tokens + prompt(2, 5)            # the next chat turn
    tokens2, last = await run(engine, follow_up, greedy(10))
    assert tokens2 == hf_greedy(llama, follow_up, 10)
    # every full block of turn 1 whose KV was computed: all but the last sampled token
    assert last.cached_tokens[Tier.GPU] == (len(first) + 10 - 1) // BS * BS
    engine.store.check_integrity()
    await engine.stop()


async def test_host_hit_matches_generate(llama):
    engine = make_engine(llama, gpu=12, host=32)
    await engine.start()
    a, b = prompt(1, 26), prompt(2, 26)
    await run(engine, a, greedy(8))
    await run(engine, b, greedy(8))                      # pushes A's blocks to the host
    tokens, last = await run(engine, a + [7, 8, 9], greedy(8))
    assert last.cached_tokens[Tier.HOST] > 0
    assert tokens == hf_greedy(llama, a + [7, 8, 9], 8)
    engine.store.check_integrity()
    await engine.stop()


async def test_disk_hit_and_restart_match_generate(llama, tmp_path):
    disk = str(tmp_path / "kv")
    engine = make_engine(llama, gpu=12, host=8, disk=disk, disk_blocks=256)
    await engine.start()
    prompts = [prompt(i, 26) for i in range(4)]
    for p in prompts:
        await run(engine, p, greedy(6))                  # the first ones end up on disk
        await engine.store.flush()                       # time passes: the writes land
    tokens, last = await run(engine, prompts[0] + [5], greedy(8))
    assert last.cached_tokens[Tier.DISK] > 0
    assert tokens == hf_greedy(llama, prompts[0] + [5], 8)
    await engine.stop()                                  # persists GPU and host blocks too

    restarted = make_engine(llama, gpu=12, host=32, disk=disk, disk_blocks=256)   # reads: a quarter
    await restarted.start()
    restarted.costs.prefill_tokens_per_s = 1.0          # computing is slow: the disk part is read
    tokens, last = await run(restarted, prompts[3] + [9], greedy(8))
    assert last.cached_tokens[Tier.DISK] == 24           # all 6 full blocks, from the old process
    assert tokens == hf_greedy(llama, prompts[3] + [9], 8)
    restarted.store.check_integrity()
    await restarted.stop()


async def test_a_prefix_that_goes_to_disk_while_waiting_is_loaded_at_admission(llama, tmp_path):
    engine = make_engine(llama, gpu=12, host=8, disk=str(tmp_path / "kv"), disk_blocks=256, max_seqs=1)
    await engine.start()
    a, b = prompt(1, 26), prompt(2, 40)
    await run(engine, a, greedy(6))
    await run(engine, prompt(3, 26), greedy(6))          # A's blocks go to the host tier
    assert Tier.HOST in engine.store.match(engine.store.root_key(), a).tiers
    first = engine.submit(Request(b, greedy(4)))                  # runs first and pushes A's blocks to disk
    second = engine.submit(Request(a + [5], greedy(8)))           # waits (one sequence at a time)
    await collect(first)
    tokens, last = await collect(second)
    assert last.cached_tokens[Tier.DISK] > 0
    assert tokens == hf_greedy(llama, a + [5], 8)
    assert not engine.store.load_ids()                           # its load ended with it
    engine.store.check_integrity()
    await engine.stop()


@pytest.mark.parametrize("disk_s,host_s,loaded", [(1, 1, Tier.DISK), (100, 1, Tier.HOST), (1, 100, Tier.GPU)])
async def test_hits_are_recomputed_when_loading_is_slower(llama, tmp_path, disk_s, host_s, loaded):
    """With measured rates that make a tier slower than prefill, its hits are recomputed (and
    counted), and the output is unchanged; faster tiers before it are still used."""
    engine = make_engine(llama, gpu=12, host=8, disk=str(tmp_path / "kv"), disk_blocks=256)
    await engine.start()
    prompts = [prompt(i, 26) for i in range(4)]
    for p in prompts:
        await run(engine, p, greedy(6))                  # the first ones end up on disk, then host
        await engine.store.flush()                       # time passes: the writes land
    engine.costs.prefill_tokens_per_s = 1.0              # tokens/s: a block recomputes in 4 s
    engine.costs.host_bytes_per_s = engine.store.layout.block_bytes / host_s      # a block in host_s
    engine.store.disk_read_rate = engine.store.layout.block_bytes / disk_s        # and in disk_s
    follow_up = prompts[1] + [5]                         # 5 blocks on the host, then 1 on disk
    found = engine.store.match(engine.store.root_key(), follow_up).tiers
    assert Tier.DISK in found and Tier.HOST in found
    tokens, last = await run(engine, follow_up, greedy(8))
    assert tokens == hf_greedy(llama, follow_up, 8)
    assert {t for t, n in last.cached_tokens.items() if n} == {t for t in Tier if t <= loaded} - {Tier.GPU}
    recomputed = {t.name.lower(): sum(x is t for x in found) for t in (Tier.HOST, Tier.DISK) if t > loaded}
    assert engine.recomputed_blocks == recomputed
    engine.store.check_integrity()
    await engine.stop()


@pytest.mark.parametrize("host", [64, 0], ids=["host", "gpu-only"])
async def test_preempted_sequences_resume_exactly(llama, host):
    # 4 sequences of 12 + 40 tokens need 52 blocks; the GPU has 30: decodes run out of blocks.
    # A preempted sequence leaves its blocks cached; with a host tier they come back from it
    engine = make_engine(llama, gpu=30, host=host, max_batched=64)
    await engine.start()
    prompts = [prompt(10 + i, 12) for i in range(4)]
    results = await asyncio.gather(*(run(engine, p, greedy(40)) for p in prompts))
    assert engine.scheduler.num_preemptions > 0
    assert (engine.store.stats().tiers[Tier.HOST].promotions > 0) == bool(host)   # not recomputed
    for p, (tokens, _) in zip(prompts, results):
        assert tokens == hf_greedy(llama, p, 40)
    engine.store.check_integrity()
    assert engine.store.stats().tiers[Tier.GPU].locked == 0
    await engine.stop()


async def test_many_concurrent_requests_of_different_lengths(llama):
    engine = make_engine(llama, gpu=80, host=32, max_batched=24, max_seqs=5)
    await engine.start()
    rng = random.Random(5)
    shared = prompt(99, 12)                              # some share a prefix, some do not
    prompts = [(shared if i % 2 else []) + prompt(i, rng.randrange(1, 30)) for i in range(12)]
    lengths = [rng.randrange(1, 16) for _ in prompts]
    results = await asyncio.gather(*(run(engine, p, greedy(n)) for p, n in zip(prompts, lengths)))
    for p, n, (tokens, last) in zip(prompts, lengths, results):
        assert tokens == hf_greedy(llama, p, n)
        assert last.completion_tokens == n
    engine.store.check_integrity()
    await engine.stop()
