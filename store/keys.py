"""Block keys: a chained xxh3_128 over the token ids of full blocks.

    key_0 = xxh3_128(root || tokens of block 0)
    key_i = xxh3_128(key_{i-1} || tokens of block i)
    root  = xxh3_128("kvgate-root" || model fingerprint || namespace)

A prefix the operator declares public is chained from the public root instead, shared by every
namespace; the block after it chains from xxh3_128("kvgate-private" || key of the last public
block || the namespace's root), so what follows a public prefix is still the namespace's own
(`Scope`).

A key therefore names a whole prefix, not one block: equal keys mean equal prefixes (up to a
hash collision, which the radix index catches by comparing token ids). Token ids are hashed as
little-endian uint32, so keys written to disk on one machine are valid on another.
"""
from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from store.errors import PublicPrefixesFull

KEY_BYTES = 16
TOKEN_BYTES = 4  # one token id, uint32
_hash = xxhash.xxh3_128_digest


def root_key(model_fingerprint: str, namespace: str = "") -> bytes:
    """The parent of every first block: different models or namespaces never share a key."""
    return _hash(b"kvgate-root\0" + model_fingerprint.encode() + b"\0" + namespace.encode())


def public_root_key(model_fingerprint: str) -> bytes:
    """The parent of the first block of every public prefix: one for all namespaces."""
    return _hash(b"kvgate-public\0" + model_fingerprint.encode())


def private_key(parent: bytes, namespace_root: bytes) -> bytes:
    """What the first block after a public prefix ending in block `parent` chains from."""
    return _hash(b"kvgate-private\0" + parent + namespace_root)


@dataclass(frozen=True)
class Scope:
    """Whose cache a token list's blocks are in. Its first `shared` blocks (a declared public
    prefix, 0 if none) chain from the public root `public`; the rest are the namespace's, whose
    root is `root`: chained from it, or, after a public prefix, from `private_key`."""
    root: bytes
    public: bytes = b""
    shared: int = 0

    @property
    def first(self) -> bytes:
        """The root key block 0 chains from."""
        return self.public if self.shared else self.root

    def parent_key(self, i: int, previous: bytes) -> bytes:
        """The key block `i` chains from, given `previous`: block i-1's key (`first` for i = 0)."""
        return private_key(previous, self.root) if i == self.shared > 0 else previous

    def namespace(self, i: int) -> bytes:
        """The root key of the namespace block `i` belongs to."""
        return self.public if i < self.shared else self.root

    def keys(self, tokens: bytes, block_size: int) -> list[bytes]:
        """Keys of every full block of `tokens` (as `token_bytes`)."""
        if not self.shared:
            return block_keys(self.root, tokens, block_size)
        cut = self.shared * block_size * TOKEN_BYTES
        public = block_keys(self.public, tokens[:cut], block_size)
        if len(public) < self.shared:
            return public
        return public + block_keys(private_key(public[-1], self.root), tokens[cut:], block_size)


class PublicPrefixes:
    """The prefixes declared public: the key of each of their blocks under the public root. A
    prompt's leading blocks found among them are shared by every namespace."""

    def __init__(self, model_fingerprint: str) -> None:
        self.root = public_root_key(model_fingerprint)
        self.keys: set[bytes] = set()
        self._last: set[bytes] = set()   # the last block's key of each prefix declared

    @property
    def count(self) -> int:
        """Prefixes declared (a prefix declared twice counts once)."""
        return len(self._last)

    def declare(self, tokens: bytes, block_size: int, max_blocks: int | None = None) -> int:
        """Make the full blocks of `tokens` (as `token_bytes`) public; returns how many. Raises
        PublicPrefixesFull (declaring nothing) if the public blocks would then be more than
        `max_blocks`."""
        keys = block_keys(self.root, tokens, block_size)
        total = len(self.keys.union(keys))
        if max_blocks is not None and total > max_blocks:
            raise PublicPrefixesFull(f"public prefixes would hold {total} blocks; at most {max_blocks} may be "
                                     "public: every tenant's own cache needs the rest")
        self.keys.update(keys)
        self._last.update(keys[-1:])
        return len(keys)

    def scope(self, root: bytes, token_ids: Sequence[int], block_size: int) -> Scope:
        """The scope of a prompt of the namespace whose root is `root`: one hash for a prompt
        that starts with no public prefix, none while none is declared."""
        shared, parent = 0, self.root
        if self.keys:
            for i in range(len(token_ids) // block_size):
                parent = chain_key(parent, token_bytes(token_ids[i * block_size:(i + 1) * block_size]))
                if parent not in self.keys:
                    break
                shared = i + 1
        return Scope(root, self.root, shared)


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
