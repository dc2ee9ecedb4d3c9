import pytest

from store import OutOfBlocks, Tier
from store.keys import chain_key, token_bytes
from tests.conftest import BS, admit_from_disk, assert_cached_kv, assert_loaded_kv, finish_request, run_request, write_kv


def prompt(seed: int, n_blocks: int = 3, extra: int = 0) -> list[int]:
    return [seed * 1000 + i for i in range(n_blocks * BS + extra)]


def assert_idle(store):
    """No sequence holds anything: every block is free or cached, in every pool."""
    s = store.stats()
    for t in (Tier.GPU, Tier.HOST):
        assert s.tiers[t].locked == 0, s.tiers[t]
        assert s.tiers[t].free + s.tiers[t].cached == s.tiers[t].capacity
    store.check_integrity()


def test_miss_then_gpu_hit(store_factory):
    store = store_factory(gpu=8)
    first = run_request(store, "a", prompt(1, extra=2))
    assert first.num_cached_tokens == 0
    again = run_request(store, "b", prompt(1, extra=3))
    assert again.cached_tokens == {Tier.GPU: 3 * BS, Tier.HOST: 0, Tier.DISK: 0}
    assert store.stats().tiers[Tier.GPU].hits == 3
    assert_idle(store)


def test_gpu_eviction_demotes_to_host_and_promotes_back(store_factory):
    store = store_factory(gpu=4, host=8)
    run_request(store, "a", prompt(1))
    run_request(store, "b", prompt(2))   # needs 2 of A's GPU blocks: A's tail goes to the host
    assert store.match(store.root_key(), prompt(1)).tiers == (Tier.GPU, Tier.HOST, Tier.HOST)
    seq = run_request(store, "a2", prompt(1))    # checks the promoted KV is A's
    assert seq.cached_tokens == {Tier.GPU: BS, Tier.HOST: 2 * BS, Tier.DISK: 0}
    s = store.stats().tiers
    assert s[Tier.GPU].evictions == 2 + 2 and s[Tier.HOST].promotions == 2
    assert_idle(store)


async def test_host_eviction_writes_to_disk_and_a_sequence_load_reads_back(store_factory):
    store = store_factory(gpu=3, host=3, disk_blocks=16)
    for i in range(1, 4):
        run_request(store, i, prompt(i))
    m = store.match(store.root_key(), prompt(1))
    assert m.tiers == (Tier.DISK,) * 3
    # admit alone never uses disk-only blocks (it never waits on the disk) ...
    seq = store.admit("x", store.root_key(), prompt(1))
    assert seq.num_cached_tokens == 0
    store.release("x")
    seq, filled = await admit_from_disk(store, "a2", prompt(1))   # ... a sequence's load reads them
    assert seq.num_cached_tokens == 0 and filled == 3
    assert_loaded_kv(store, seq, prompt(1), filled)
    finish_request(store, seq, prompt(1))
    assert store.stats().tiers[Tier.DISK].promotions == 3
    await store.flush()
    assert_idle(store)


def test_allocation_failure_changes_nothing(store_factory):
    store = store_factory(gpu=4, host=2)
    run_request(store, "cached", prompt(9, n_blocks=2))
    store.admit("big", store.root_key(), prompt(1, n_blocks=2))   # locks 2, 2 cached left
    before = store.stats()
    with pytest.raises(OutOfBlocks):
        store.admit("too-big", store.root_key(), prompt(2, n_blocks=3))
    with pytest.raises(OutOfBlocks):
        store.grow("big", 5 * BS)
    assert store.stats() == before
    assert len(store.block_table("big")) == 2
    store.check_integrity()
    store.release("big")
    assert_idle(store)


def test_bad_admissions_raise_and_leave_no_trace(store_factory):
    store = store_factory(gpu=4)
    store.admit("a", store.root_key(), prompt(1, n_blocks=1))
    with pytest.raises(ValueError, match="already admitted"):
        store.admit("a", store.root_key(), prompt(2, n_blocks=1))
    with pytest.raises(ValueError, match="at least one token"):
        store.admit("b", store.root_key(), [])
    with pytest.raises(ValueError, match="token ids"):
        store.admit("c", store.root_key(), [1, -5, 3])
    assert store.num_sequences == 1
    store.release("a")
    assert_idle(store)


def test_higher_retention_priority_outlives_lru(store_factory):
    store = store_factory(gpu=6)
    run_request(store, "system", prompt(1, n_blocks=2), priority=10)  # oldest, but precious
    run_request(store, "chat1", prompt(2, n_blocks=2))
    run_request(store, "chat2", prompt(3, n_blocks=2))
    run_request(store, "chat3", prompt(4, n_blocks=2))    # must evict 2 blocks
    tiers = lambda p: store.match(store.root_key(), p).tiers  # noqa: E731
    assert tiers(prompt(1, n_blocks=2)) == (Tier.GPU, Tier.GPU)
    assert tiers(prompt(2, n_blocks=2)) == ()              # no host tier: dropped
    assert store.stats().dropped == 2
    assert_idle(store)


def test_commit_during_generation_lets_the_next_turn_hit(store_factory):
    store = store_factory(gpu=16)
    tokens = prompt(1, n_blocks=1, extra=1)
    seq = store.admit("chat", store.root_key(), tokens)
    write_kv(store, seq, tokens)
    assert store.commit("chat", tokens) == 1
    for t in range(7):           # decode: one token a step, committing blocks as they fill
        tokens.append(500 + t)
        store.grow("chat", len(tokens))
        write_kv(store, seq, tokens)
        store.commit("chat", tokens)
        store.check_integrity()
    assert len(seq.path) == 3 and len(tokens) == 3 * BS
    store.release("chat")
    next_turn = run_request(store, "turn2", tokens + [7, 7, 7])
    assert next_turn.cached_tokens[Tier.GPU] == 3 * BS


def test_commit_respects_num_computed_tokens(store_factory):
    store = store_factory(gpu=8)
    tokens = prompt(1, n_blocks=3)
    store.admit("a", store.root_key(), tokens)
    assert store.commit("a", tokens, num_computed_tokens=BS + 1) == 1  # chunked prefill
    assert store.commit("a", tokens, num_computed_tokens=3 * BS) == 2
    store.release("a")
    assert_idle(store)


def test_same_block_committed_twice_is_indexed_once(store_factory):
    store = store_factory(gpu=8)
    tokens = prompt(1, n_blocks=2)
    a = store.admit("a", store.root_key(), tokens)
    b = store.admit("b", store.root_key(), tokens)   # both miss: they run concurrently
    for seq in (a, b):
        write_kv(store, seq, tokens)
    store.commit("a", tokens)
    store.commit("b", tokens)
    assert a.path == b.path and b.owned == set(b.slots)  # b keeps its own copy
    assert store.index.num_nodes == 2
    store.check_integrity()
    store.release("a")
    store.release("b")
    assert store.stats().tiers[Tier.GPU].free == 6
    assert_idle(store)


def test_commit_adopts_our_copy_when_the_cached_one_left_the_gpu(store_factory):
    store = store_factory(gpu=4, host=4)
    tokens = prompt(1, n_blocks=2)
    late = store.admit("late", store.root_key(), tokens)       # misses, computes its own
    write_kv(store, late, tokens)
    run_request(store, "early", tokens[:BS] + [1, 2, 3, 4])    # indexes block 0 first...
    run_request(store, "evictor", prompt(5, n_blocks=2))       # ...which goes to the host
    assert store.match(store.root_key(), tokens).tiers == (Tier.HOST,)
    store.commit("late", tokens)
    node = late.path[0]
    assert node.gpu_slot == late.slots[0] and late.slots[0] not in late.owned
    store.check_integrity()
    store.release("late")
    assert_idle(store)


def test_key_collision_stops_indexing_for_that_sequence(store_factory):
    store = store_factory(gpu=8)
    tokens = prompt(1, n_blocks=2)
    root = store.index.root(store.root_key())
    # Force a collision: some other block already indexed under the key of our block 0.
    fake = store.index.insert(root, chain_key(root.key, token_bytes(tokens[:BS])), token_bytes([0] * BS), 0)
    store.index.set_gpu(fake, store.gpu.allocate(1)[0])
    seq = store.admit("a", store.root_key(), tokens)
    assert seq.num_cached_tokens == 0          # the colliding block is not served
    write_kv(store, seq, tokens)
    assert store.commit("a", tokens) == 0 and not seq.cacheable
    store.release("a")
    assert store.index.num_nodes == 1
    assert_idle(store)


def test_max_cached_tokens_leaves_the_last_block_to_compute(store_factory):
    store = store_factory(gpu=8)
    tokens = prompt(1, n_blocks=2)
    run_request(store, "a", tokens)
    seq = store.admit("b", store.root_key(), tokens, max_cached_tokens=len(tokens) - 1)
    assert seq.num_cached_tokens == BS
    assert_cached_kv(store, seq, tokens)
    store.release("b")
    assert_idle(store)


def test_priority_of_a_cached_prefix_is_raised_by_its_users(store_factory):
    store = store_factory(gpu=8)
    run_request(store, "low", prompt(1, n_blocks=1), priority=0)
    run_request(store, "high", prompt(1, n_blocks=1, extra=1), priority=7)
    (node,) = store.match(store.root_key(), prompt(1, n_blocks=1)).nodes
    assert node.priority == 7


