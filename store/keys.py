"""Block keys: a chained xxh3_128 over the token ids of full blocks.

    key_0 = xxh3_128(root || tokens of block 0)
    key_i = xxh3_128(key_{i-1} || tokens of block i)
    root  = xxh3_128("kvgate-root" || model fingerprint || namespace)

A key therefore names a whole prefix, not one block: equal keys mean equal prefixes (up to a
hash collision, which the radix index catches by comparing token ids). Token ids are hashed as
little-endian uint32, so keys written to disk on one machine are valid on another.
"""
from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence

import xxhash

KEY_BYTES = 16
TOKEN_BYTES = 4  # one token id, uint32
_hash = xxhash.xxh3_128_digest


def root_key(model_fingerprint: str, namespace: str = "") -> bytes:
    """The parent of every first block: different models or namespaces never share a key."""
    return _hash(b"kvgate-root\0" + model_fingerprint.encode() + b"\0" + namespace.encode())


def token_bytes(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian uint32 bytes (what keys hash and the index compares)."""
    try:
        packed = array("I", token_ids)
    except (OverflowError, TypeError) as e:
        raise ValueError(f"token ids must be ints in [0, 2**32): {e}") from None
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def chain_key(parent: bytes, block_tokens: bytes) -> bytes:
    """The key of one block given its parent's key and its tokens as `token_bytes`."""
    return _hash(parent + block_tokens)


def block_keys(parent: bytes, tokens: bytes, block_size: int) -> list[bytes]:
    """Keys of every full block of `tokens` (as `token_bytes`) chained from `parent`."""
    step = block_size * TOKEN_BYTES
    keys = []
    for start in range(0, len(tokens) - step + 1, step):
        parent = _hash(parent + tokens[start:start + step])
        keys.append(parent)
    return keys
