"""Block keys: a chained xxh3_128 over the token ids of full blocks.

    key_0 = xxh3_128(root || tokens of block 0)
    key_i = xxh3_128(key_{i-1} || tokens of block i)
    root  = xxh3_128("kvgate-root" || model fingerprint || namespace)

A prefix the operator declares public is chained from the public root instead, shared by every
namespace; the block after it chains from xxh3_128("kvgate-private" || key of the last public
block || the namespace's root), so what follows a public prefix is still the namespace's own
(`Scope`).

A request's keys are computed once, as its token list's blocks are needed, and carried with it
(`BlockKeys`): matching, indexing a filled block, the first miss and the blocks being computed
all read them there.

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


class BlockKeys:
    """The keys of a token list's full blocks in its scope, each computed once, when first
    needed, and kept. A sequence carries its own: its tokens are only ever appended, so the key
    of a full block never changes. Every user of the keys also has the token ids and compares
    them (the radix index, a record read from disk): keys computed from other tokens than the
    ones passed can cost a hit, never serve a wrong block."""
    __slots__ = ("scope", "block_size", "_keys")

    def __init__(self, scope: Scope, block_size: int, known: Sequence[bytes] = ()) -> None:
        self.scope = scope
        self.block_size = block_size
        self._keys = list(known)          # key of block i, i = 0 .. len - 1

    def upto(self, token_ids: Sequence[int], num_blocks: int) -> list[bytes]:
        """Keys of the first `num_blocks` blocks of `token_ids` (each full), computing those not
        computed yet."""
        keys, bs = self._keys, self.block_size
        for i in range(len(keys), num_blocks):
            block = token_bytes(token_ids[i * bs:(i + 1) * bs])
            keys.append(chain_key(self.scope.parent_key(i, keys[-1] if keys else self.scope.first), block))
        return keys[:num_blocks]

    def all(self, token_ids: Sequence[int]) -> list[bytes]:
        """Keys of every full block of `token_ids`."""
        return self.upto(token_ids, len(token_ids) // self.block_size)


class PublicPrefixes:
    """The prefixes declared public: the key of each of their blocks under the public root. A
    prompt's leading blocks found among them are shared by every namespace."""

    def __init__(self, model_fingerprint: str) -> None:
        self.root = public_root_key(model_fingerprint)
        self.declared: set[bytes] = set()   # the key of each public block
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
        total = len(self.declared.union(keys))
        if max_blocks is not None and total > max_blocks:
            raise PublicPrefixesFull(f"public prefixes would hold {total} blocks; at most {max_blocks} may be "
                                     "public: every tenant's own cache needs the rest")
        self.declared.update(keys)
        self._last.update(keys[-1:])
        return len(keys)

    def keys(self, root: bytes, token_ids: Sequence[int], block_size: int) -> BlockKeys:
        """The block keys of a prompt of the namespace whose root is `root`, in its scope: the
        leading blocks found among the public prefixes' are shared (their keys, computed to find
        them, are kept); one hash for a prompt that starts with no public prefix, none while none
        is declared."""
        found: list[bytes] = []
        if self.declared:
            parent = self.root
            for i in range(len(token_ids) // block_size):
                parent = chain_key(parent, token_bytes(token_ids[i * block_size:(i + 1) * block_size]))
                if parent not in self.declared:
                    break
                found.append(parent)
        return BlockKeys(Scope(root, self.root, len(found)), block_size, found)


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
