import pytest
import xxhash

from store.keys import block_keys, chain_key, root_key, token_bytes


def test_token_bytes_are_little_endian_uint32():
    assert token_bytes([1, 256]) == b"\x01\x00\x00\x00\x00\x01\x00\x00"


@pytest.mark.parametrize("bad", [[-1], [2**32], [1.5], ["a"]])
def test_bad_token_ids_raise_value_error(bad):
    with pytest.raises(ValueError):
        token_bytes(bad)


def test_keys_chain_over_full_blocks_only():
    root = root_key("fp")
    toks = token_bytes(range(10))
    keys = block_keys(root, toks, 4)
    assert len(keys) == 2  # 10 tokens = 2 full blocks + 2 tokens that are never keyed
    assert keys[0] == xxhash.xxh3_128_digest(root + token_bytes(range(4)))
    assert keys[1] == chain_key(keys[0], token_bytes(range(4, 8)))


def test_key_names_the_whole_prefix():
    root = root_key("fp")
    a = block_keys(root, token_bytes([1, 2, 3, 4, 5, 6, 7, 8]), 4)
    b = block_keys(root, token_bytes([9, 2, 3, 4, 5, 6, 7, 8]), 4)
    assert a[1] != b[1]  # same second block, different first block


def test_root_separates_models_and_namespaces():
    roots = {root_key("m1", ""), root_key("m2", ""), root_key("m1", "tenant-a"), root_key("m1", "tenant-b")}
    assert len(roots) == 4
    toks = token_bytes(range(4))
    assert len({block_keys(r, toks, 4)[0] for r in roots}) == 4


def test_key_format_is_stable():
    # Keys name records on disk: changing the hash or encoding must be a format version bump.
    assert root_key("fp", "ns").hex() == xxhash.xxh3_128_hexdigest(b"kvgate-root\0fp\0ns")
    assert block_keys(b"\0" * 16, token_bytes([1, 2]), 2)[0].hex() == \
        xxhash.xxh3_128_hexdigest(b"\0" * 16 + b"\x01\0\0\0\x02\0\0\0")


def test_a_requests_block_keys_are_each_computed_once(monkeypatch):
    """A request's keys are hashed once and carried (BlockKeys): matching it on every step it
    waits, admitting it, indexing its blocks as they fill and checking whose prefix is being
    computed all read them. Two requests, the second waiting behind the first for blocks: each
    full block each computed is hashed once (the first: 31 computed tokens, 7 blocks; the
    second: 27, 6), however many steps the second waited."""
    from store import keys as store_keys
    from tests.scheduling import SchedulerDriver
    calls = []
    real = store_keys.chain_key
    monkeypatch.setattr(store_keys, "chain_key", lambda parent, block: calls.append(parent + block) or real(parent, block))
    driver = SchedulerDriver(gpu=8, max_batched=8, max_seqs=4)
    driver.add("first", [7] * 24, 8)
    second = driver.add("second", list(range(20)), 8)
    driver.run()
    assert driver.scheduler.num_blocked_admissions > 0         # it waited, matched again each step
    assert second.num_generated == 8
    assert len(calls) == len(set(calls)) == 7 + 6
