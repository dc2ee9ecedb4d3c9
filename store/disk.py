"""The disk tier: KV blocks in LMDB, written behind, read back verified.

One LMDB record per block; key = the block key (16 bytes). Value:

    u32 little-endian header length | msgpack header | raw payload (the block's KV bytes)

    header = {"v": format version, "fp": model fingerprint, "parent": parent key,
              "tokens": token ids as uint32 LE bytes, "depth": block index in its sequence,
              "prio": retention priority, "t": unix time written,
              "dtype": "torch.bfloat16", "shape": [num_layers, 2, block_size, kv_heads, head_dim],
              "sum": xxh3_64 of the payload}

A value is served only if all of these hold: the header parses, the version, fingerprint, dtype
and shape are ours, the payload has the expected length and checksum, and
chain_key(parent, tokens) == the record's key (so parent and tokens are the ones the key names).
Anything else is a miss: the record is deleted, counted and logged.

All LMDB calls run on one thread (`self._io`): a write transaction never leaves the thread that
opened it, and the map can be grown there safely (no other transaction is open). The event loop
only queues work and keeps the byte accounting.
"""
from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import lmdb
import msgpack
import torch
import xxhash

from store.errors import DiskTierError
from store.keys import chain_key
from store.pool import BlockLayout

log = logging.getLogger("kvgate.store.disk")

FORMAT_VERSION = 1
_HEADER_LEN = struct.Struct("<I")
_MIB = 1 << 20


class CorruptValue(Exception):
    """A stored value failed a check; the message says which."""


@dataclass(frozen=True)
class DiskEntry:
    """What the start-up scan learns about one valid record (its payload is not read)."""
    key: bytes
    parent: bytes
    token_bytes: bytes
    depth: int
    priority: int
    written_at: float
    nbytes: int


@dataclass
class DiskCounters:
    reads: int = 0
    writes: int = 0
    deletes: int = 0
    corrupt_dropped: int = 0   # failed a check (checksum, format, fingerprint, key) and deleted
    write_errors: int = 0      # puts lost to an LMDB error (disk full, ...)
    pending_full: int = 0      # puts refused because the write queue was over its byte budget
    map_resizes: int = 0


class DiskTier:
    """KV blocks in an LMDB directory, capped at `max_bytes` of values."""

    def __init__(self, path: str, fingerprint: str, layout: BlockLayout, max_bytes: int, *,
                 initial_map_bytes: int = 64 * _MIB, max_pending_bytes: int = 512 * _MIB,
                 on_lost: Callable[[list[bytes]], None] | None = None) -> None:
        if max_bytes <= 0:
            raise DiskTierError(f"disk tier {path!r}: max_bytes must be > 0, got {max_bytes}")
        self.path = path
        self.fingerprint = fingerprint
        self.layout = layout
        self.max_bytes = max_bytes
        self.max_pending_bytes = max_pending_bytes
        self.on_lost = on_lost or (lambda keys: None)
        self.counters = DiskCounters()
        # loop-side view of the records: in LMDB or queued to be written; key -> value bytes
        self.sizes: dict[bytes, int] = {}
        self.used_bytes = 0
        self._pending: dict[bytes, bytes | bytearray] = {}   # queued puts, readable at once
        self._pending_bytes = 0
        self._ops: deque[tuple[bytes, bytes | bytearray | None]] = deque()  # None = delete
        self._flusher: asyncio.Task | None = None
        self._io = ThreadPoolExecutor(1, thread_name_prefix="kvgate-lmdb")
        try:
            os.makedirs(path, exist_ok=True)
            self._env = lmdb.open(path, map_size=initial_map_bytes, subdir=True, sync=False,
                                  metasync=False, readahead=False, max_dbs=0)
            # reader slots left by processes that died would pin old pages forever
            self.stale_readers_cleared = self._env.reader_check()
        except (OSError, lmdb.Error) as e:
            self._io.shutdown()
            raise DiskTierError(f"cannot open disk tier at {path!r}: {e}") from e
        self._max_map = max(initial_map_bytes, 2 * max_bytes + 64 * _MIB)

    @property
    def value_bytes(self) -> int:
        """Size of one record's value (header sizes vary by a few bytes; this bounds them)."""
        return self.layout.block_bytes + 256 + 4 * self.layout.block_size

    # ---- format -----------------------------------------------------------------------------

    def encode(self, parent: bytes, token_bytes: bytes, depth: int, priority: int,
               payload: torch.Tensor) -> bytearray:
        """One record's value; `payload` is the block's KV (any dtype, contiguous)."""
        data = payload.contiguous().view(torch.uint8).reshape(-1)
        header = msgpack.packb({
            "v": FORMAT_VERSION, "fp": self.fingerprint, "parent": parent, "tokens": token_bytes,
            "depth": depth, "prio": priority, "t": time.time(), "dtype": str(self.layout.dtype),
            "shape": list(self.layout.block_shape), "sum": xxhash.xxh3_64_intdigest(data.numpy())})
        start = _HEADER_LEN.size + len(header)
        value = bytearray(start + data.numel())
        _HEADER_LEN.pack_into(value, 0, len(header))
        value[_HEADER_LEN.size:start] = header
        torch.frombuffer(value, dtype=torch.uint8, offset=start).copy_(data)
        return value

    def _header(self, key: bytes, value: memoryview) -> tuple[dict, int]:
        """The checked header and where the payload starts; raises CorruptValue."""
        if len(value) < _HEADER_LEN.size:
            raise CorruptValue("truncated before the header")
        (n,) = _HEADER_LEN.unpack_from(value, 0)
        start = _HEADER_LEN.size + n
        if start > len(value):
            raise CorruptValue("truncated header")
        try:
            h = msgpack.unpackb(value[_HEADER_LEN.size:start])
        except Exception as e:  # msgpack raises several unrelated types on garbage
            raise CorruptValue(f"header does not parse: {e}") from None
        if not isinstance(h, dict) or h.get("v") != FORMAT_VERSION:
            raise CorruptValue("unknown format version")
        if h.get("fp") != self.fingerprint:
            raise CorruptValue("written by another model (fingerprint differs)")
        if h.get("dtype") != str(self.layout.dtype) or h.get("shape") != list(self.layout.block_shape):
            raise CorruptValue("dtype or shape differs from this model's blocks")
        if len(value) - start != self.layout.block_bytes:
            raise CorruptValue(f"payload is {len(value) - start} bytes, expected {self.layout.block_bytes}")
        parent, tokens = h.get("parent"), h.get("tokens")
        if not isinstance(parent, bytes) or not isinstance(tokens, bytes) or chain_key(parent, tokens) != key:
            raise CorruptValue("parent and tokens do not hash to the record's key")
        return h, start

    def _payload(self, key: bytes, value: memoryview, parent: bytes, token_bytes: bytes) -> memoryview:
        h, start = self._header(key, value)
        if h["parent"] != parent or h["tokens"] != token_bytes:
            raise CorruptValue("parent or tokens differ from the index's")
        payload = value[start:]
        if xxhash.xxh3_64_intdigest(payload) != h["sum"]:
            raise CorruptValue("payload checksum mismatch")
        return payload

    # ---- start-up scan (synchronous: runs before serving) -----------------------------------

    def scan(self) -> list[DiskEntry]:
        """Headers of every valid record, parents before children. Invalid records and
        records whose chain does not reach a first block are deleted and counted."""
        return self._io.submit(self._scan).result()

    def _scan(self) -> list[DiskEntry]:
        entries: dict[bytes, DiskEntry] = {}
        bad: list[bytes] = []
        with self._env.begin(buffers=True) as txn:
            for key, value in txn.cursor():
                key = bytes(key)
                try:
                    h, _ = self._header(key, value)
                    entries[key] = DiskEntry(key, h["parent"], h["tokens"], int(h["depth"]),
                                             int(h["prio"]), float(h["t"]), len(value))
                except (CorruptValue, KeyError, TypeError, ValueError) as e:
                    log.warning("disk tier: dropping record %s: %s", key.hex(), e)
                    bad.append(key)
        children: dict[bytes, list[DiskEntry]] = {}
        for e in entries.values():
            children.setdefault(e.parent, []).append(e)
        ordered = [e for e in entries.values() if e.depth == 0]
        for e in ordered:  # grows while iterating: breadth-first from the first blocks
            ordered.extend(c for c in children.get(e.key, ()) if c.depth == e.depth + 1)
        reached = {e.key for e in ordered}
        orphans = [k for k in entries if k not in reached]
        if bad or orphans:
            with self._env.begin(write=True) as txn:
                for k in bad + orphans:
                    txn.delete(k)
        self.counters.corrupt_dropped += len(bad)
        self.counters.deletes += len(orphans)
        if orphans:
            log.info("disk tier: deleted %d records whose prefix is gone", len(orphans))
        for e in ordered:
            self.sizes[e.key] = e.nbytes
            self.used_bytes += e.nbytes
        return ordered

    # ---- writes (queued on the loop, applied on the I/O thread) -----------------------------

    def put(self, key: bytes, value: bytes | bytearray) -> bool:
        """Queue a record. False (and nothing queued) if the write queue is over budget; the
        caller must first make room under `max_bytes` (see `Placement`)."""
        if self._pending_bytes + len(value) > self.max_pending_bytes:
            self.counters.pending_full += 1
            return False
        if key in self.sizes:
            self._forget(key)
        self.sizes[key] = len(value)
        self.used_bytes += len(value)
        self._pending[key] = value
        self._pending_bytes += len(value)
        self._ops.append((key, value))
        self._kick()
        return True

    def delete(self, key: bytes) -> None:
        if key in self.sizes:
            self._forget(key)
            self._ops.append((key, None))
            self._kick()

    def _forget(self, key: bytes) -> None:
        self.used_bytes -= self.sizes.pop(key)
        value = self._pending.pop(key, None)
        if value is not None:
            self._pending_bytes -= len(value)

    def _kick(self) -> None:
        """Start the background flusher if an event loop runs here (else `flush` does it)."""
        if self._flusher is None or self._flusher.done():
            try:
                self._flusher = asyncio.get_running_loop().create_task(self._drain())
            except RuntimeError:
                pass

    async def flush(self) -> None:
        """Write every queued operation to LMDB (and let the background flusher finish)."""
        while self._ops or (self._flusher is not None and not self._flusher.done()):
            if self._flusher is not None and not self._flusher.done():
                await asyncio.shield(self._flusher)
            else:
                await self._drain()

    async def _drain(self) -> None:
        # Several drains may overlap; batches still reach the one I/O thread in queue order.
        loop = asyncio.get_running_loop()
        while self._ops:
            batch = self._take_batch()
            lost = await loop.run_in_executor(self._io, self._apply, batch)
            self._after_batch(batch, lost)

    def make_queue_room(self, nbytes: int) -> None:
        """Write queued records now (blocking) if `nbytes` more would not fit the write queue."""
        if self._pending_bytes + nbytes > self.max_pending_bytes:
            self.flush_sync()

    def flush_sync(self) -> None:
        while self._ops:
            batch = self._take_batch()
            self._after_batch(batch, self._io.submit(self._apply, batch).result())

    def _take_batch(self, max_bytes: int = 64 * _MIB) -> list[tuple[bytes, bytes | bytearray | None]]:
        batch, size = [], 0
        while self._ops and (not batch or size < max_bytes):
            op = self._ops.popleft()
            batch.append(op)
            size += len(op[1]) if op[1] is not None else 0
        return batch

    def _after_batch(self, batch: list, lost: list[bytes]) -> None:
        for key, value in batch:
            if value is not None and self._pending.get(key) is value:
                del self._pending[key]
                self._pending_bytes -= len(value)
        lost = [k for k in lost if k in self.sizes and k not in self._pending]
        for k in lost:
            self.used_bytes -= self.sizes.pop(k)
        self.counters.write_errors += len(lost)
        if lost:
            self.on_lost(lost)

    def _apply(self, batch: list[tuple[bytes, bytes | bytearray | None]]) -> list[bytes]:
        """Runs on the I/O thread: apply a batch in one transaction. Returns the keys whose
        puts were lost. MapFullError grows the map and retries; never escapes."""
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for key, value in batch:
                        if value is None:
                            txn.delete(key)
                        else:
                            txn.put(key, value)
                self.counters.writes += sum(v is not None for _, v in batch)
                self.counters.deletes += sum(v is None for _, v in batch)
                return []
            except lmdb.MapFullError:
                size = self._env.info()["map_size"]
                if size >= self._max_map:
                    log.error("disk tier: LMDB map full at its limit of %d MiB", size // _MIB)
                    break
                self._env.set_mapsize(min(2 * size, self._max_map))
                self.counters.map_resizes += 1
            except lmdb.Error as e:
                log.error("disk tier: write of %d records failed: %s", len(batch), e)
                break
        deletes = [k for k, v in batch if v is None]
        try:  # deletes free space, so they usually still go through
            with self._env.begin(write=True) as txn:
                for k in deletes:
                    txn.delete(k)
        except lmdb.Error as e:
            log.error("disk tier: %d deletes failed too: %s", len(deletes), e)
        return [k for k, v in batch if v is not None]

    # ---- reads ------------------------------------------------------------------------------

    async def load(self, items: list[tuple[bytes, bytes, bytes]],
                   sink: Callable[[int, memoryview], None]) -> list[bool]:
        """Read and verify records `(key, parent, token_bytes)`; for each valid one, call
        `sink(i, payload)` on the I/O thread (payload valid only during the call). Returns
        which succeeded; failed records are deleted and counted."""
        pending = [self._pending.get(k) for k, _, _ in items]
        loop = asyncio.get_running_loop()
        ok, corrupt = await loop.run_in_executor(self._io, self._load, items, pending, sink)
        for k in corrupt:
            self.counters.corrupt_dropped += 1
            self.delete(k)
        return ok

    def _load(self, items: list[tuple[bytes, bytes, bytes]], pending: list,
              sink: Callable[[int, memoryview], None]) -> tuple[list[bool], list[bytes]]:
        ok, corrupt = [False] * len(items), []
        try:
            with self._env.begin(buffers=True) as txn:
                for i, ((key, parent, tokens), queued) in enumerate(zip(items, pending)):
                    value = memoryview(queued) if queued is not None else txn.get(key)
                    self.counters.reads += 1
                    if value is None:
                        continue
                    try:
                        sink(i, self._payload(key, value, parent, tokens))
                        ok[i] = True
                    except CorruptValue as e:
                        log.warning("disk tier: record %s is not served: %s", key.hex(), e)
                        corrupt.append(key)
        except lmdb.Error as e:  # the environment itself failed: what was not read is a miss
            log.error("disk tier: read failed: %s", e)
        return ok, corrupt

    # ---- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Write what is queued, sync and close. Call `await flush()` first inside a loop."""
        if self._io is None:
            return
        self.flush_sync()
        self._io.submit(self._close_env).result()
        self._io.shutdown()
        self._io = None

    def _close_env(self) -> None:
        self._env.sync(True)
        self._env.close()

    def check_integrity(self) -> None:
        assert self.used_bytes == sum(self.sizes.values()), "disk bytes drifted"
        assert self._pending_bytes == sum(len(v) for v in self._pending.values())
        assert all(k in self.sizes for k in self._pending), "pending record not accounted"
