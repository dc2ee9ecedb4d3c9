"""The disk tier's record format: one LMDB value per block, every byte of it checksummed.

    u32 LE header length n | u64 LE xxh3_64 of the header | msgpack header (n bytes) | payload

(laid out by `pack_value`, in store/disk_process.py: the disk process imports nothing else)

    header = {"v": format version, "fp": model fingerprint, "parent": parent key,
              "ns"?: the namespace root mixed into the key (only the first block after a public
                     prefix: store/keys.py),
              "tokens": token ids as uint32 LE bytes, "depth": block index in its sequence,
              "prio": retention priority, "t": unix time written,
              "dtype": "torch.bfloat16", "shape": [num_layers, 2, block_size, kv_heads, head_dim],
              "sum": xxh3_64 of the payload}

The header checksum covers every field the start-up scan trusts (depth orders the rebuild,
priority and time order eviction), and the header's "sum" covers the payload. A value is served
only if all of these hold: both checksums match, the version, fingerprint, dtype and shape are
ours, the payload has the expected length, and chain_key(parent, tokens) == the record's key (so
parent and tokens are the ones the key names; after a public prefix, chain_key(private_key(parent,
ns), tokens)). Anything else raises CorruptValue.
"""
from __future__ import annotations

import time

import msgpack
import numpy as np
import torch
import xxhash

from store.disk_process import PREFIX as _PREFIX
from store.disk_process import pack_value
from store.keys import chain_key, private_key
from store.pool import BlockLayout

FORMAT_VERSION = 2


class CorruptValue(Exception):
    """A stored value failed a check; the message says which."""


class RecordFormat:
    """Encodes and checks the records of one model (fingerprint) and block layout."""

    def __init__(self, fingerprint: str, layout: BlockLayout) -> None:
        self.fingerprint = fingerprint
        self.layout = layout

    @property
    def max_bytes(self) -> int:
        """An upper bound on one record's size (headers vary by a few bytes)."""
        return self.layout.block_bytes + 256 + 4 * self.layout.block_size

    def encode(self, parent: bytes, token_bytes: bytes, depth: int, priority: int,
               payload: torch.Tensor | np.ndarray, namespace: bytes = b"") -> bytearray:
        """One record's value; `payload` is the block's KV (a contiguous tensor of any dtype, or
        its bytes), `namespace` the one mixed into its key (Node.mixed). Raises OverflowError for
        a priority beyond 64 bits (the store refuses those first)."""
        return pack_value(self.fields(parent, token_bytes, depth, priority, namespace), payload_bytes(payload))

    def fields(self, parent: bytes, token_bytes: bytes, depth: int, priority: int,
               namespace: bytes = b"") -> dict:
        """A record's header but its payload checksum (`pack_value` adds it, where it encodes).
        OverflowError for a priority msgpack cannot hold (past 64 bits)."""
        if not -2**63 <= priority < 2**64:
            raise OverflowError(f"priority {priority} does not fit in 64 bits")
        header = {
            "v": FORMAT_VERSION, "fp": self.fingerprint, "parent": parent, "tokens": token_bytes,
            "depth": depth, "prio": priority, "t": time.time(), "dtype": str(self.layout.dtype),
            "shape": list(self.layout.block_shape)}
        if namespace:
            header["ns"] = namespace
        return header

    def header(self, key: bytes, value: memoryview | bytes, length: int | None = None) -> tuple[dict, int]:
        """The checked header and where the payload starts; raises CorruptValue. `value` is the
        record, or its head (up to the payload) when `length` gives the record's length."""
        length = len(value) if length is None else length
        if len(value) < _PREFIX.size:
            raise CorruptValue("truncated before the header")
        n, checksum = _PREFIX.unpack_from(value, 0)
        start = _PREFIX.size + n
        if start > min(length, len(value)):
            raise CorruptValue("truncated header")
        raw = value[_PREFIX.size:start]
        if xxhash.xxh3_64_intdigest(raw) != checksum:
            raise CorruptValue("header checksum mismatch")
        try:
            h = msgpack.unpackb(raw)
        except Exception as e:  # msgpack raises several unrelated types on garbage
            raise CorruptValue(f"header does not parse: {e}") from None
        if not isinstance(h, dict) or h.get("v") != FORMAT_VERSION:
            raise CorruptValue("unknown format version")
        if h.get("fp") != self.fingerprint:
            raise CorruptValue("written by another model (fingerprint differs)")
        if h.get("dtype") != str(self.layout.dtype) or h.get("shape") != list(self.layout.block_shape):
            raise CorruptValue("dtype or shape differs from this model's blocks")
        if length - start != self.layout.block_bytes:
            raise CorruptValue(f"payload is {length - start} bytes, expected {self.layout.block_bytes}")
        parent, tokens, ns = h.get("parent"), h.get("tokens"), h.setdefault("ns", b"")
        if not all(isinstance(f, bytes) for f in (parent, tokens, ns)) or \
                chain_key(private_key(parent, ns) if ns else parent, tokens) != key:
            raise CorruptValue("parent and tokens do not hash to the record's key")
        if not all(isinstance(h.get(f), int) for f in ("depth", "prio")) or not isinstance(h.get("t"), float):
            raise CorruptValue("depth, priority or time is not a number")
        return h, start

    def check(self, key: bytes, head: bytes, length: int, checksum: int | None, parent: bytes,
              token_bytes: bytes) -> bool:
        """True if a record read by the disk process (store/disk_process.py) may be served: its
        head (the value up to the payload) checks out, names the index's parent and tokens, and
        the payload copied has the checksum the header gives; else raises CorruptValue."""
        h, _ = self.header(key, head, length)
        if h["parent"] != parent or h["tokens"] != token_bytes:
            raise CorruptValue("parent or tokens differ from the index's")
        if checksum != h["sum"]:
            raise CorruptValue("payload checksum mismatch")
        return True


def payload_bytes(payload: torch.Tensor | np.ndarray) -> memoryview:
    """A block's KV as flat bytes: a pool's `bytes` row as it is, a tensor through a view."""
    if isinstance(payload, torch.Tensor):
        payload = payload.contiguous().view(torch.uint8).reshape(-1).numpy()
    return memoryview(payload).cast("B")
