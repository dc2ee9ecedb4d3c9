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
