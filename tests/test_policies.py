"""Policies, pinned: each test fails when the policy changes, not only when counts stop adding
up. Scheduling: urgency order, the token budget, the preemption victim and where its KV goes,
an abort while preempted. Store: which blocks a too-small host tier keeps, what a lock pins, what `persist` writes.
(The disk record's checksum coverage and the write/re-queue race are in test_store_disk_open.py.)"""
import asyncio
import threading

import pytest

from engine.request import Request
from engine.sequence import Status
from store import Tier
from tests.conftest import make_store, run_request, write_kv
from tests.engine_util import greedy, make_engine, prompt
from tests.scheduling import SchedulerDriver


def test_running_sequences_are_served_in_urgency_order_within_the_token_budget():
    sched = SchedulerDriver(max_batched=4, max_seqs=8)           # no model: the plans themselves
    sched.add("low", [3, 4], max_tokens=4, priority=0)
    steps = [sched.step()]
    for name, priority in (("high", 5), ("mid", 2)):
        sched.add(name, [10 + priority] * 7, max_tokens=2, priority=priority)
    steps += [sched.step() for _ in range(4)]
    assert steps == [
        [("low", 0, 2)],
        [("low", 2, 1), ("high", 0, 3)],      # running first; the most urgent waiting is chunked
        [("high", 3, 4)],                     # running, most urgent first: low gets no token
        [("high", 7, 1), ("low", 3, 1), ("mid", 0, 2)],
        [("mid", 2, 4)],                      # high is done; mid outranks low and takes all 4
    ]
    assert all(sum(n for *_, n in s) <= 4 for s in steps)


def test_admission_fills_the_budget_and_chunks_a_long_prompt():
    sched = SchedulerDriver(max_batched=4, max_seqs=8)
    sched.add("long", list(range(3, 13)), max_tokens=1)
    sched.add("short", [5, 6, 7], max_tokens=1)
    assert sched.run() == [[("long", 0, 4)], [("long", 4, 4)], [("long", 8, 2), ("short", 0, 2)], [("short", 2, 1)]]


@pytest.mark.parametrize("priorities,victim", [((0, 5, 3), "a"), ((2, 2, 2), "c"), ((4, 1, 1), "c")])
def test_decode_pressure_preempts_the_least_urgent_running_sequence(priorities, victim):
    """Three running sequences fill the GPU pool but one block; the first to need a new block
    gets it, the next forces a preemption: of the least urgent (lowest priority, then latest).
    The victim waits again with its full blocks cached, and comes back with them: it computes
    only its last, partial block again."""
    sched = SchedulerDriver(gpu=7, host=32, max_batched=64, max_seqs=8)
    seqs = {name: sched.add(name, [ord(name)] * 8, max_tokens=4, priority=priority)
            for name, priority in zip("abc", priorities)}
    while sched.scheduler.num_preemptions == 0:
        assert sched.step()
    assert sched.scheduler.num_preemptions == 1        # the victim, directly
    assert seqs[victim].status is Status.WAITING
    assert all(seq.status is Status.RUNNING for n, seq in seqs.items() if n != victim)
    seq = seqs[victim]
    assert len(seq.token_ids) == 9                      # its prompt and the token it sampled
    assert len(sched.store.match(seq.keys, seq.token_ids).nodes) == 2      # both full blocks cached
    resumed = [(start, n) for step in sched.run() for name, start, n in step if name == victim]
    assert resumed[0] == (8, 1)                         # from its cached blocks, not from token 0
    assert all(s.status is Status.FINISHED and s.num_generated == 4 for s in seqs.values())


def test_a_request_that_finds_no_kv_room_waits_and_each_blocked_step_is_counted():
    """A 3-block GPU pool: the first request takes 2 blocks for its prompt and a third as it
    decodes; the second, needing 2, waits 4 steps, until the first finishes and its blocks
    become evictable. It cannot preempt the first: it is less urgent (it came later)."""
    driver = SchedulerDriver(gpu=3, max_batched=64, max_seqs=8)
    driver.add("first", prompt(1, 8), 4)
    second = driver.add("second", prompt(2, 8), 4)
    steps = [driver.step() for _ in range(5)]
    assert [s for s in steps if any(r == "second" for r, _, _ in s)] == [steps[4]]   # admitted at step 5
    assert second.status is Status.RUNNING and driver.scheduler.num_blocked_admissions == 4
    assert driver.scheduler.num_preemptions == 0


async def test_with_async_scheduling_a_blocked_request_waits_one_step_more(llama):
    """The same pool through the engine with async scheduling: the first request's last token is
    read back a step after it is launched, so its blocks become evictable a step later (5)."""
    engine = make_engine(llama, gpu=3, max_batched=64, max_seqs=8, async_scheduling=True)
    engine.submit(Request(prompt(1, 8), greedy(4)))
    second = engine._requests[engine.submit(Request(prompt(2, 8), greedy(4))).request_id]
    steps = 0
    while second.status is Status.WAITING and steps < 10:
        await engine.step()
        steps += 1
    assert steps == 6 and engine.scheduler.num_blocked_admissions == 5
    assert engine.scheduler.num_preemptions == 0


def test_an_abort_while_preempted_leaves_its_blocks_cached_and_owned_by_none():
    driver = SchedulerDriver(gpu=7, host=32, max_batched=64, max_seqs=8)
    seqs = [driver.add(f"r{n}", [n] * 8, 20, priority=p) for n, p in ((3, 0), (4, 1), (5, 2))]
    for _ in range(20):
        if driver.scheduler.num_preemptions:
            break
        driver.step()
    preempted = seqs[0]
    assert preempted.status is Status.WAITING
    assert preempted.request_id not in driver.store.sequence_ids()     # it holds no slot
    driver.abort(preempted)
    assert len(driver.store.match(preempted.keys, [3] * 8).nodes) == 2       # still cached
    assert not any(r == "r3" for step in driver.run() for r, _, _ in step)   # never scheduled again
    stats = driver.store.stats().tiers
    assert stats[Tier.HOST].locked == 0 and stats[Tier.GPU].locked == 0


def test_a_host_tier_too_small_for_a_demoted_prefix_keeps_its_shallow_blocks():
    store = make_store(gpu=4, host=2)
    first = list(range(100, 116))                    # 4 blocks
    run_request(store, "first", first)
    run_request(store, "second", list(range(200, 216)))   # takes the whole GPU pool
    match = store.match(store.root_key(), first)
    assert match.tiers == (Tier.HOST, Tier.HOST)     # blocks 0 and 1: a usable prefix
    assert store.stats().tiers[Tier.HOST].cached == 2
    store.close()


def test_a_lock_pins_only_the_fastest_copy():
    store = make_store(gpu=4, host=4)
    tokens = list(range(100, 108))                   # 2 blocks
    run_request(store, "warm", tokens)
    run_request(store, "evict", list(range(200, 216)))     # demotes them to host
    seq = store.admit("again", store.root_key(), tokens + [1])   # promotes: GPU + host copies
    assert seq.tiers == (Tier.HOST, Tier.HOST)
    nodes = list(seq.path)
    assert all(n.gpu_slot is not None and n.host_slot is not None for n in nodes)
    index = store.index
    assert index.num_locked[Tier.GPU] >= 2 and index.num_locked[Tier.HOST] == 0
    victims = index.select_victims(Tier.HOST, 4)
    assert set(nodes) <= set(victims)                # the host copies may go while in use
    store.release("again")
    store.close()


async def test_persist_writes_only_blocks_whose_parent_is_on_disk(tmp_path):
    store = make_store(tmp_path, gpu=16, host=4, disk_blocks=64)
    broken, whole = list(range(100, 112)), list(range(300, 312))      # 3 blocks each
    for name, tokens in (("broken", broken), ("whole", whole)):
        seq = store.admit(name, store.root_key(), tokens)
        write_kv(store, seq, tokens)
        store.commit(name, tokens)
        store.release(name)
    refused = store.match(store.root_key(), broken).nodes[0].key
    real = store.disk.put
    store.disk.put = lambda key, value: False if key == refused else real(key, value)
    assert store.persist() == (3, 0)                     # whole's 3; none of broken's
    assert [n.on_disk for n in store.match(store.root_key(), broken).nodes] == [False] * 3
    assert [n.on_disk for n in store.match(store.root_key(), whole).nodes] == [True] * 3
    await store.flush()
    store.check_integrity()
    store.close()


def blocks(seed: int, n: int = 2) -> list[int]:
    """A prompt of `n` full blocks of the store tests' size (4 tokens)."""
    return [seed * 100 + i for i in range(4 * n)]


@pytest.mark.parametrize("policy,written,skipped", [
    ("all", ["a", "b", "reused"], 0),                  # every block that leaves the GPU
    ("second-use", ["reused"], 8),                     # only blocks two sequences used
    ("shutdown", [], 10),                              # none while serving
])
async def test_the_write_policy_decides_which_blocks_leaving_the_gpu_are_written(
        tmp_path, policy, written, skipped):
    store = make_store(tmp_path, gpu=2, host=2, disk_blocks=32, write_policy=policy)
    prompts = {"a": blocks(1), "b": blocks(2), "reused": blocks(3)}
    run_request(store, "a", prompts["a"])
    run_request(store, "reused", prompts["reused"])
    run_request(store, "reused-again", prompts["reused"])        # its second use
    run_request(store, "b", prompts["b"])
    for i in range(4, 7):             # pushes all three down and out (and blocks(4) through host)
        run_request(store, i, blocks(i))
    on_disk = [name for name, p in prompts.items()
               if store.match(store.root_key(), p).tiers == (Tier.DISK,) * 2]
    assert on_disk == written
    assert store.stats().writes_skipped.get("policy", 0) == skipped
    store.check_integrity()
    if policy == "shutdown":                                     # ... and everything at the end
        assert store.persist() == (4, 0) and store.stats().disk.pending_full == 0
    await store.flush()
    store.close()


async def test_auto_writes_everything_until_the_queue_is_half_full_then_only_reused_blocks(tmp_path):
    store = make_store(tmp_path, gpu=2, host=16, disk_blocks=64, write_policy="auto")
    store.disk.max_pending_bytes = 4 * store.disk.value_bytes    # half full = 2 records queued
    run_request(store, "single", blocks(1), flush=False)
    run_request(store, "other", blocks(2), flush=False)
    run_request(store, "reused", blocks(3), flush=False)
    run_request(store, "reused-again", blocks(3), flush=False)   # used twice
    for i in (4, 5):                                             # no time for the writes to land
        run_request(store, i, blocks(i), flush=False)
    written = [i for i in range(1, 6) if all(n.on_disk for n in store.match(store.root_key(), blocks(i)).nodes)]
    # blocks(1) left the GPU while the queue was empty and filled it to half; blocks(2) and
    # blocks(4), single-use, left at half full: skipped and counted; blocks(3) were reused:
    # written all the same. All of them stay cached in the host tier meanwhile.
    assert written == [1, 3]
    assert store.stats().writes_skipped["policy"] == 4
    assert all(n.host_slot is not None for i in range(1, 5) for n in store.match(store.root_key(), blocks(i)).nodes)
    await store.flush()
    store.check_integrity()
    store.close()


async def test_a_preempted_sequences_blocks_take_a_full_host_tier_from_older_cached_ones(tmp_path):
    """Preemption leaves a sequence's blocks cached, used last: when the GPU needs their room
    they move to the host tier, and older cached host blocks, already written to disk, make
    room for them (they stay cached on disk); recomputation is the last resort."""
    store = make_store(tmp_path, gpu=4, host=4, disk_blocks=64)
    for i in range(1, 5):
        run_request(store, i, blocks(i))                         # GPU: 3, 4; host: 1, 2 (full)
    assert store.stats().tiers[Tier.HOST].free == 0
    seq = store.admit("running", store.root_key(), blocks(9, 4))  # 3 and 4 -> host, 1 and 2 -> disk
    write_kv(store, seq, blocks(9, 4))
    store.commit("running", blocks(9, 4))
    store.release("running")                                     # preempted
    store.disk.flush_sync()                                      # time passes: the writes land
    run_request(store, "other", blocks(8, 4), flush=False)       # needs the GPU: running's 4 go to host
    tiers = lambda p: store.match(store.root_key(), p).tiers  # noqa: E731
    assert tiers(blocks(9, 4)) == (Tier.HOST,) * 4
    assert [tiers(blocks(i)) for i in range(1, 5)] == [(Tier.DISK,) * 2] * 4
    assert store.stats().writes_skipped.get("disk_busy", 0) == 0 and store.stats().overload == {}
    store.check_integrity()
    await store.flush()
    store.close()


async def test_the_host_tier_evicts_written_blocks_first_then_cancels_queued_writes_never_running_ones(tmp_path):
    """A write never holds a host slot the host tier needs: written (or unwanted) blocks go
    first whatever their age; then a block whose write is still queued goes, its write
    cancelled (lost, as without a disk tier, and counted); a block being encoded never goes."""
    store = make_store(tmp_path, gpu=2, host=4, disk_blocks=64)
    run_request(store, 1, blocks(1))
    run_request(store, 2, blocks(2))                  # 1 -> host, written
    run_request(store, 3, blocks(3), flush=False)     # 2 -> host, its writes queued
    store.match(store.root_key(), blocks(1))          # 1 is now used later than 2
    tiers = lambda p: store.match(store.root_key(), p).tiers  # noqa: E731
    store.host.free(store.placement.reserve_host(2))  # written 1 goes, though 2 is older
    assert tiers(blocks(1)) == (Tier.DISK,) * 2 and tiers(blocks(2)) == (Tier.HOST,) * 2
    store.host.free(store.placement.reserve_host(4))  # only 2 is left: its queued writes are cancelled
    assert tiers(blocks(2)) == () and store.stats().writes_skipped["disk_busy"] == 2
    store.check_integrity()

    run_request(store, 4, blocks(4), flush=False)     # 3 -> host, its writes queued ...
    gate = threading.Event()
    store.disk._io.submit(gate.wait)                  # ... and taken by the I/O thread, held there
    await asyncio.sleep(0.01)
    slots = store.placement.reserve_host(4)           # the two free slots; 3 is being written: it stays
    assert len(slots) == 2 and tiers(blocks(3)) == (Tier.HOST,) * 2
    store.host.free(slots)
    held = {n.host_slot for n in store.match(store.root_key(), blocks(3)).nodes}
    assert store.evict_prefix(store.root_key(), blocks(3)) == 2      # dropped while being encoded ...
    assert set(store.placement.writing_slots) == held and not held & store.host.free_slots()
    store.check_integrity()                           # ... its slots are the write's until it is done
    gate.set()
    await store.flush()
    assert not store.placement.writing_slots and held <= store.host.free_slots()
    store.check_integrity()
    store.close()
