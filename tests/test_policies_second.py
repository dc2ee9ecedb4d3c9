"""Policies the second adversarial report found unpinned (issue 24, item 12): for each, changing
the one line that makes the policy fails its test here. docs/reliability.md lists them."""
import asyncio
import collections
from collections import Counter

import pytest

from engine.fairness import OUTPUT_TOKEN_COST, FairQueue, TenantShare
from engine.request import Request
from engine.sampling import SamplingParams, process
from engine.sequence import Status
from engine.serving.kv_events import EventLog, namespace_id
from store import Tier
from tests.conftest import make_store, run_request
from tests.engine_util import greedy, make_engine, prompt
from tests.test_engine_tiers import restarted_with_a_gated_disk
from tests.scheduling import SchedulerDriver
from tests.test_fairness import seq


# ---- fair share ---------------------------------------------------------------------------------

def test_a_tenant_arriving_from_idle_is_lifted_to_the_least_served_active_tenant():
    q = FairQueue()
    q.requeue(seq("x1", "x", 0))
    q.requeue(seq("y1", "y", 1))
    q.charge("x", 100, 0)
    q.charge("y", 300, 0)
    q.add(seq("z1", "z", 2), active={"x", "y"})
    assert q.served["z"] == 100                      # the least of the active, not the most


def test_the_least_served_tenant_goes_first_though_its_request_came_later():
    q = FairQueue()
    q.requeue(seq("early", "busy", 0))
    q.requeue(seq("late", "quiet", 9))
    q.charge("busy", 50, 0)
    assert q.pop(Counter()).request_id == "late"


async def test_a_decode_row_costs_its_tenant_more_than_a_prompt_token(llama):
    engine = make_engine(llama, async_scheduling=False, tenants={"a": TenantShare(weight=2)})
    engine.submit(Request(prompt(1, 8), greedy(3), namespace="a"))
    served = engine.scheduler._waiting.served
    await engine.step()                              # the prompt: 8 tokens, weight 2
    assert served["a"] == 8 / 2
    await engine.step()                              # one decode row
    assert served["a"] == (8 + OUTPUT_TOKEN_COST) / 2
    while await engine.step():
        pass


# ---- the store: shares, retention, tiers ---------------------------------------------------------

def test_max_kv_share_evicts_only_the_tenants_excess_then_by_recency():
    """An 8-block pool: the light tenant's 3 blocks (least recent), the heavy tenant's 5 with a
    cap of 4. A heavy request needing 2 evicts 1 of heavy's (its excess), then the least recent
    block of all: light's last."""
    store = make_store(gpu=8)
    store.cap_gpu_share({"heavy": 0.5})
    bs = store.block_size
    light = list(range(1, 1 + 3 * bs))
    run_request(store, "l", light, namespace="light")
    run_request(store, "h0", [100 + j for j in range(3 * bs)], namespace="heavy")
    run_request(store, "h1", [200 + j for j in range(2 * bs)], namespace="heavy")
    run_request(store, "h2", [300 + j for j in range(2 * bs)], namespace="heavy")
    assert store.match(store.root_key("light"), light).tiers == (Tier.GPU, Tier.GPU)
    assert store.index.gpu_blocks[store.root_key("heavy")] == 5 - 1 + 2
    store.close()


def test_a_later_weaker_retention_never_shortens_a_live_stronger_one():
    store = make_store(gpu=8)
    run_request(store, "r", list(range(8)))
    nodes = list(store.match(store.root_key(), list(range(8))).nodes)
    now = [1000.0]
    store.index.clock = lambda: now[0]
    store.index.retain(nodes, priority=5, until=1100.0)
    store.index.retain(nodes, priority=1, until=1050.0)         # weaker and shorter: no effect
    assert all((n.retain_priority, n.retain_until) == (5, 1100.0) for n in nodes)
    store.index.retain(nodes, priority=1, until=1200.0)         # weaker, longer: the later deadline
    assert all((n.retain_priority, n.retain_until) == (5, 1200.0) for n in nodes)
    now[0] = 1300.0                                             # expired: a new one stands alone
    store.index.retain(nodes, priority=2, until=1400.0)
    assert all((n.retain_priority, n.retain_until) == (2, 1400.0) for n in nodes)
    store.close()


@pytest.mark.parametrize("first_priority,demoted", [(0, "first"), (5, "second")])
async def test_host_blocks_go_to_disk_lowest_priority_then_least_recent(tmp_path, first_priority, demoted):
    """Three prefixes of 2 blocks wait in a 6-block host tier: the next 2 to go down to disk
    are the least recent prefix's (leaf first), unless it has the higher priority."""
    store = make_store(tmp_path, gpu=2, host=6, disk_blocks=64)
    bs = store.block_size
    prefixes = {name: [base + j for j in range(2 * bs)] for name, base in
                (("first", 100), ("second", 200), ("third", 300), ("fourth", 400))}
    for name, tokens in prefixes.items():
        run_request(store, name, tokens, priority=first_priority if name == "first" else 0)
    nodes = {name: store.match(store.root_key(), tokens).nodes for name, tokens in prefixes.items()}
    assert all(n.host_slot is not None for name in ("first", "second", "third") for n in nodes[name])
    victims = store.index.select_victims(Tier.HOST, 2)
    assert victims == [nodes[demoted][1], nodes[demoted][0]]
    store.close()


async def test_blocks_are_written_when_they_leave_the_gpu_and_never_when_a_host_copy_goes(tmp_path):
    store = make_store(tmp_path, gpu=4, host=2, disk_blocks=64, write_policy="shutdown")
    bs = store.block_size
    doc = list(range(100, 100 + 2 * bs))
    run_request(store, "doc", doc)
    run_request(store, "other", list(range(200, 200 + 4 * bs)))        # doc's blocks go to the host
    seq = store.admit("again", store.root_key(), doc + [1])             # promoted: GPU and host copies
    assert seq.tiers == (Tier.HOST, Tier.HOST)
    store.placement.write_policy = "all"
    slots = store.placement.reserve_host(2)                             # the host copies must go
    await store.flush()
    assert len(slots) == 2 and store.stats().disk.writes == 0
    assert not any(n.on_disk for n in seq.path)                         # still on the GPU: not written
    store.host.free(slots)
    store.release("again")
    store.check_integrity()
    store.close()


# ---- KV events and the router ------------------------------------------------------------------

def test_the_first_block_after_a_public_prefix_carries_the_tenants_namespace_id():
    store = make_store(gpu=16)
    bs = store.block_size
    public = list(range(1, 1 + 2 * bs))
    store.declare_public(public)
    log = EventLog(store, b"k" * 32)
    log.attach()
    log.drain()
    run_request(store, "p", public + list(range(100, 100 + 2 * bs)), namespace="acme")
    stored = [e for e in log.drain() if e[0] == "BlockStored"]
    blocks = [(key, (e[8][i] if len(e) > 8 else None)) for e in stored for i, key in enumerate(e[1])]
    assert [extra for _, extra in blocks] == [None, None, [namespace_id(b"k" * 32, "acme")], None]
    store.close()


def test_the_store_queues_every_copy_that_appears_or_goes_while_recording():
    """The KV events read the store's own queue of placement changes, in order, one entry per
    copy that appears in a tier or leaves it; nothing is queued before or after recording."""
    store = make_store(gpu=2, host=4)
    bs = store.block_size
    run_request(store, "before", list(range(1, 1 + bs)))        # not recorded
    changes = store.record_changes()
    assert not changes.pending.is_set() and changes.take() == []
    run_request(store, "a", list(range(100, 100 + 2 * bs)))     # two blocks on the GPU; "before" leaves it
    taken = [(n.key, t, present) for n, t, present in changes.take()]
    a = store.match(store.root_key(), list(range(100, 100 + 2 * bs))).nodes
    before = store.match(store.root_key(), list(range(1, 1 + bs))).nodes
    assert taken == [(before[0].key, Tier.HOST, True), (before[0].key, Tier.GPU, False),
                     (a[0].key, Tier.GPU, True), (a[1].key, Tier.GPU, True)]
    assert not changes.pending.is_set()
    store.stop_recording()
    run_request(store, "after", list(range(200, 200 + bs)))
    assert changes.take() == []
    store.close()


async def test_a_routed_prefix_counts_as_its_replicas_before_any_event():
    pytest.importorskip("ray.serve")
    from gateway.engines.router import KvPrefixRouter, PrefixIndex
    replica_id = collections.namedtuple("ReplicaId", "unique_id")

    class Replica:
        def __init__(self, name):
            self.replica_id, self.routing_stats = replica_id(name), None

    class Pending:
        def __init__(self, keys, rid):
            self.args = [{"block_keys": keys}]
            self.metadata = collections.namedtuple("Meta", "internal_request_id")(rid)
    router = KvPrefixRouter.__new__(KvPrefixRouter)
    router.imbalance, router.index, router._routed = 16, PrefixIndex(), {}
    router.in_flight = collections.Counter()
    router.feed = None
    replicas = [Replica("a"), Replica("b")]
    keys = [b"k1", b"k2", b"k3"]
    first = (await router.choose_replicas(replicas, Pending(keys, "r1")))[0][0]
    assert router.index.matched(first.replica_id.unique_id, keys) == 3    # before any KV event
    router.in_flight.clear()
    for i in range(8):                              # the same prefix follows it, though idle elsewhere
        again = (await router.choose_replicas(replicas, Pending(keys, f"r{i + 2}")))[0][0]
        router.in_flight.clear()
        assert again is first


# ---- sampling and stop strings ------------------------------------------------------------------

def test_the_stop_string_first_in_the_text_wins_whatever_the_order_given():
    from engine.detokenizer import Detokenizer
    from engine.model import load_tokenizer
    from engine.config import ModelConfig
    tokenizer = load_tokenizer(ModelConfig(path="builtin:tiny"))
    ids = tokenizer.encode("one two three four")
    for stops in (("four", "two"), ("two", "four")):
        for per_step in (1, len(ids)):              # token by token, or all in one step's window
            d = Detokenizer(tokenizer, stops)
            out, stopped = "", False
            for end in range(per_step, len(ids) + per_step, per_step):
                piece, stopped = d.step(ids[:end], 0)
                out += piece
                if stopped:
                    break
            assert stopped and out == "one ", (stops, per_step, out)


def test_min_tokens_holds_the_end_tokens_up_to_its_last_position():
    import torch
    p = SamplingParams(min_tokens=3, max_tokens=10, end_ids=(4,))
    row = torch.zeros(16)
    prompt_ids = [1, 2]
    held = process(row.clone(), p, (prompt_ids + [7, 8], 2))            # 2 generated: the 3rd may not end
    assert held[4] == float("-inf")
    free = process(row.clone(), p, (prompt_ids + [7, 8, 9], 2))          # 3 generated: it may
    assert free[4] == 0


async def test_min_tokens_holds_back_eos_unless_eos_is_ignored(llama):
    engine = make_engine(llama)
    eos = tuple(sorted(engine.loaded.eos_token_ids))
    assert eos
    for ignore, expected in ((False, (9,) + eos), (True, (9,))):
        stream = engine.submit(Request(prompt(1, 5), SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=(9,),
                                                            ignore_eos=ignore)))
        assert engine._requests[stream.request_id].params.end_ids == expected
        engine.abort(stream.request_id)


# ---- an abort while waiting for a disk read ------------------------------------------------------

async def test_an_aborted_waiting_request_drops_its_disk_load_and_host_slots(llama, tmp_path):
    document = prompt(2, 24)
    engine, gate = await restarted_with_a_gated_disk(llama, tmp_path, document)
    engine.costs.mode = "load"
    waiting = engine.submit(Request(document + [5], greedy(4)))                  # not stepped: it waits
    assert waiting.request_id in engine.store.load_ids()                 # its read started at submit
    engine.abort(waiting.request_id)
    assert waiting.request_id not in engine.store.load_ids()
    gate.set()
    for _ in range(2000):                                                # the read lands; slots freed
        if not engine.store.loader.sequence_loads():
            break
        await asyncio.sleep(0.005)
    assert not engine.store.loader.sequence_loads()
    engine.check_integrity()
    assert engine.store.stats().tiers[Tier.HOST].locked == 0
    await engine.stop()


def test_a_slot_taken_from_a_tenant_at_its_cap_lowers_its_running_count_at_once():
    """A full batch of 4: tenant a at its cap of 3, x with 1. b's request takes a slot from a
    (a now runs 2, below its cap): a's urgent waiting request is next in line, before d's —
    it is refused a slot (a is above its share), and admission stops there this step."""
    driver = SchedulerDriver(gpu=256, max_seqs=4, max_batched=256, tenants={"a": TenantShare(max_running=3)})
    runs = [driver.add(f"r{i}", prompt(i, 4), 50, tenant=ns) for i, ns in enumerate("aaax")]
    driver.step()
    assert all(s.status is Status.RUNNING for s in runs)
    b = driver.add("b", prompt(10, 4), 5, tenant="b")
    urgent = driver.add("urgent", prompt(11, 4), 5, priority=5, tenant="a")
    d = driver.add("d", prompt(12, 4), 5, tenant="d")
    assert ("b", 0, 4) in driver.step()
    assert b.status is Status.RUNNING and driver.scheduler.num_preemptions == 1
    assert urgent.status is Status.WAITING and d.status is Status.WAITING


# ---- issue 25: a disk write never costs the host tier more than the room asked for --------------

async def test_making_host_room_evicts_only_as_many_host_blocks_as_asked(tmp_path):
    """A 4-block host tier holding two prefixes; the GPU demotes a third (2 blocks): exactly 2
    host blocks go (the least recent prefix's, still cached on disk). The host tier once pushed
    every host block to disk, emptying the tier that returning users hit."""
    store = make_store(tmp_path, gpu=2, host=4, disk_blocks=64)
    bs = store.block_size
    prefixes = {name: [base + j for j in range(2 * bs)] for name, base in
                (("first", 100), ("second", 200), ("third", 300), ("fourth", 400))}
    for name, tokens in prefixes.items():
        run_request(store, name, tokens)                     # written through while on the host
    tiers = {name: store.match(store.root_key(), tokens).tiers for name, tokens in prefixes.items()}
    assert tiers["first"] == (Tier.DISK, Tier.DISK)
    assert tiers["second"] == (Tier.HOST, Tier.HOST) and tiers["third"] == (Tier.HOST, Tier.HOST), tiers
    await store.flush()
    store.check_integrity()
    store.close()
