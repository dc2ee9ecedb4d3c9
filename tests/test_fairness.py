"""Fair share between tenants (engine/fairness.py): the order of admission by weighted service,
the lift of a tenant arriving from idle, the cap on running sequences, and who gives up a batch
slot — pinned, and a light tenant's request beside a heavy tenant's flood through the engine."""
import asyncio
from collections import Counter

import pytest

from engine.fairness import OUTPUT_TOKEN_COST, FairQueue, TenantShare
from engine.request import Request
from engine.sequence import Sequence, Status
from store import Tier
from tests import faults
from tests.conftest import engine_stats, make_store, run_request
from tests.engine_util import collect, greedy, make_engine, prompt


def seq(name: str, tenant: str, arrival: int, priority: int = 0) -> Sequence:
    return Sequence(name, [1, 2, 3], 3, greedy(4), priority, arrival, b"", None, None, tenant=tenant)


def test_the_least_served_tenant_goes_first_weighted_and_within_priority():
    q = FairQueue({"a": TenantShare(weight=1), "b": TenantShare(weight=2)})
    for s in (seq("a1", "a", 0), seq("b1", "b", 1), seq("a2", "a", 2), seq("b2", "b", 3)):
        q.requeue(s)
    q.charge("a", prompt_tokens=100, output_tokens=0)          # a: 100
    q.charge("b", prompt_tokens=100, output_tokens=50)         # b: (100 + 2 * 50) / 2 = 100
    assert q.served == {"a": 100, "b": 100}
    q.charge("b", prompt_tokens=2, output_tokens=0)            # b: 101, now served more
    assert q.pop(Counter()).request_id == "a1"                  # the earlier arrival does not matter
    q.requeue(urgent := seq("b9", "b", 9, priority=5))
    assert q.pop(Counter()) is urgent                           # priority first, service within it
    assert OUTPUT_TOKEN_COST == 2


def test_a_tenant_arriving_from_idle_is_lifted_and_goes_first_among_equals():
    q = FairQueue()
    q.requeue(seq("h1", "heavy", 0))
    q.charge("heavy", 500, 200)
    q.add(seq("l1", "light", 1), active={"heavy"})
    assert q.served["light"] == q.served["heavy"] == 900       # no credit banked while idle
    assert q.pop(Counter({"heavy": 4})).request_id == "l1"      # tied: fewer running goes first
    q.add(seq("l2", "light", 2), active={"heavy", "light"})     # active: no lift
    assert q.served["light"] == 900


def test_a_tenant_at_its_cap_waits():
    q = FairQueue({"a": TenantShare(max_running=2)})
    q.requeue(seq("a1", "a", 0))
    q.requeue(seq("b1", "b", 1))
    q.charge("b", 1000, 0)
    assert q.pop(Counter({"a": 2})).request_id == "b1"          # a is at its cap: b, though served more
    assert q.pop(Counter({"a": 2})) is None


def test_a_full_batch_gives_a_slot_from_the_tenant_furthest_above_its_share():
    q = FairQueue({"big": TenantShare(weight=3)})
    running = [seq(f"h{i}", "heavy", i) for i in range(5)] + [seq(f"g{i}", "big", 10 + i) for i in range(3)]
    light = seq("l", "light", 20)
    # 8 slots, weights 1 (heavy), 3 (big), 1 (light): shares 1.6, 4.8, 1.6; heavy holds 5
    assert q.slot_for(light, running, max_seqs=8).request_id == "h4"           # its least urgent
    assert q.slot_for(seq("u", "light", 21, priority=-1), running, 8) is None  # not for a less urgent one
    below = [seq(f"x{i}", "light", 30 + i) for i in range(2)] + running[:6]
    assert q.slot_for(light, below, 8) is None                  # light would pass its share


async def test_a_light_tenants_request_does_not_wait_for_a_heavy_tenants_flood(llama):
    engine = make_engine(llama, gpu=256, max_seqs=4, max_batched=64)
    heavy = [engine.submit(Request(prompt(i, 8), greedy(24), namespace="heavy")) for i in range(12)]
    readers = [asyncio.create_task(collect(s)) for s in heavy]
    for _ in range(3):
        await engine.step()
    assert engine.num_running == 4 and engine.num_waiting == 8
    light = engine.submit(Request(prompt(99, 8), greedy(4), namespace="light"))
    await engine.step()                     # admitted at once: a heavy sequence gave up its slot
    assert light._seq.status is Status.RUNNING and engine.scheduler.num_preemptions == 1
    assert heavy[3]._seq.status is Status.WAITING           # the heavy tenant's least urgent running
    steps = 0
    while light._seq.status is not Status.FINISHED:
        await engine.step()
        steps += 1
    assert steps <= 6                       # its 4 tokens, not the flood's 12 x 24
    while await engine.step():
        await asyncio.sleep(0)
    for r in readers:
        assert (await r)[1].finish_reason == "length"


async def test_over_http_a_light_tenant_is_answered_while_a_heavy_tenants_flood_waits(make_client):
    tenants = [{"name": "light", "api_key": "sk-light"}, {"name": "heavy", "api_key": "sk-heavy"}]
    client = await make_client(tenants=tenants, engine={"max_num_seqs": 4}, entry=faults.slow_forward)
    done: list[str] = []

    async def ask(key: str, name: str, tokens: int) -> None:
        resp = await client.post("/v1/completions", headers={"Authorization": f"Bearer {key}"}, json={
            "model": "builtin:tiny", "prompt": f"{name} says hello", "max_tokens": tokens, "ignore_eos": True})
        assert resp.status == 200
        done.append(name)

    flood = [asyncio.create_task(ask("sk-heavy", f"heavy{i}", 24)) for i in range(12)]
    for _ in range(1000):           # the flood fills the batch and queues (its steps take 20 ms at least)
        if (await engine_stats(client))["requests"]["waiting"]:
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the flood never queued")
    await ask("sk-light", "light", 4)
    assert sum(n.startswith("heavy") for n in done) <= 6        # answered while most of the flood waits
    await asyncio.gather(*flood)
    assert len(done) == 13


@pytest.mark.parametrize("heavy_share,light_kept", [(1.0, False), (0.5, True)])
def test_a_tenant_above_its_kv_share_has_its_own_blocks_evicted_first(heavy_share, light_kept):
    """An 8-block pool: the light tenant's prefix (2 blocks, used first: least recent), then the
    heavy tenant's 6. The heavy tenant's next request needs 2: by recency alone the light
    tenant's prefix goes; with the heavy tenant capped at half the pool, 2 of its own go."""
    store = make_store(gpu=8)
    store.cap_gpu_share({"heavy": heavy_share})
    bs = store.block_size
    light = list(range(1, 1 + 2 * bs))
    run_request(store, "l", light, namespace="light")
    for i in range(3):
        run_request(store, f"h{i}", [100 + 10 * i + j for j in range(2 * bs)], namespace="heavy")
    run_request(store, "h3", [500 + j for j in range(2 * bs)], namespace="heavy")
    found = store.match(store.root_key("light"), light)
    assert (found.tiers == (Tier.GPU, Tier.GPU)) == light_kept
    assert store.placement.gpu_caps == ({} if heavy_share == 1.0 else {store.root_key("heavy"): 4})
