"""The disk tier: KV blocks in LMDB, written behind, read back verified.

One LMDB record per block; key = the block key (16 bytes), value = a checksummed record
(store/record.py). A record that fails any check is a miss: it is deleted, counted and logged,
never served. The environment is opened defensively (store/lmdb_env.py): a directory that is not
a healthy kvgate tier is moved aside and an empty tier started, so the server always starts.

While serving, every LMDB read and write happens in the disk process (store/disk_process.py),
which has an interpreter of its own: a thread of this process would wait for the interpreter
lock at every step of every block beside the busy engine loop. Writes leave through one thread
(`self._io`), which hands each batch to that process and waits for its answer: it encodes the
blocks (header, checksum, copy) from the shared pools they wait in — memory their owner keeps
unchanged until the write is done — and writes them in one transaction. Reads leave through
another (`self._reader`): the process copies each record's payload into the slot the caller
named and returns its header and the checksum of the copy, which this process checks before
anything is marked loaded. The event loop only queues work, keeps the byte accounting and checks
headers. This process opens the environment too: to check it at start-up, scan it, move it
aside when it is damaged, and mark it cleanly closed.

The tier owns its staging area (`staging`, pinned host memory when CUDA is present): reads land
there before they are copied to GPU blocks, and blocks that leave the GPU for disk without a
host-tier copy wait there to be encoded. A disk transfer never takes a host-tier slot.

When writes fail (a full disk), the failure is logged once, further puts are refused (counted)
for `write_retry_s`, and the next successful write logs the recovery.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import lmdb
import numpy as np
import torch

from store.disk_process import DiskProcess, DiskProcessDied
from store.errors import DiskTierError
from store.lmdb_env import MARK_KEY, lock_tier, mark_clean, open_env, quarantine, still_locked
from store.pool import BlockLayout, BlockPool, Tier
from store.record import CorruptValue, RecordFormat

log = logging.getLogger("kvgate.store.disk")

_MIB = 1 << 20
# LMDB's errors for a damaged file (not a full disk or a full map): the tier is moved aside
_DAMAGED = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.PanicError, lmdb.InvalidError)


@dataclass(frozen=True, eq=False)
class BlockRecord:
    """A block to write, encoded on the I/O thread. `payload` (its KV in host memory) must stay
    unchanged until `done(written)` is called on the event loop."""
    parent: bytes
    token_bytes: bytes
    depth: int
    priority: int
    payload: torch.Tensor | np.ndarray       # a tensor, or a pool's `bytes` row
    done: Callable[[bool], None] = lambda written: None
    namespace: bytes = b""        # mixed into its key (Node.mixed)


Value = bytes | bytearray | BlockRecord    # an encoded record, or one to encode


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
    namespace: bytes = b""        # mixed into its key (the first block after a public prefix)


@dataclass
class DiskCounters:
    reads: int = 0
    writes: int = 0
    deletes: int = 0
    corrupt_dropped: int = 0   # failed a check (checksum, format, fingerprint, key) and deleted
    write_errors: int = 0      # puts lost to an LMDB error (disk full, ...)
    writes_paused: int = 0     # puts refused while writes are paused after a failure
    replaced: int = 0          # times LMDB found the file damaged while serving: moved aside
    pending_full: int = 0      # puts refused because the write queue was over its byte budget
    map_resizes: int = 0       # times the writer process grew LMDB's map
    map_adoptions: int = 0     # times this process's readers took up the grown map


class DiskTier:
    """KV blocks in an LMDB directory, capped at `max_bytes` of values."""

    def __init__(self, path: str, fingerprint: str, layout: BlockLayout, max_bytes: int, *,
                 initial_map_bytes: int = 64 * _MIB, max_pending_bytes: int = 1024 * _MIB,
                 write_retry_s: float = 30.0, payload_ready: Callable[[], None] = lambda: None,
                 staging_blocks: int = 0, pin_memory: bool = False,
                 shared_pools: tuple[BlockPool, ...] = ()) -> None:
        if max_bytes <= 0:
            raise DiskTierError(f"disk tier {path!r}: max_bytes must be > 0, got {max_bytes}")
        self.path = path
        self.format = RecordFormat(fingerprint, layout)
        self.max_bytes = max_bytes
        self.max_pending_bytes = max_pending_bytes
        self.payload_ready = payload_ready   # blocks until queued copies into host memory landed
        self.counters = DiskCounters()
        # loop-side view of the records: in LMDB or queued to be written; key -> value bytes
        self.sizes: dict[bytes, int] = {}
        self.used_bytes = 0
        self._pending: dict[bytes, Value] = {}   # queued puts, readable at once
        self._pending_bytes = 0
        # BlockRecords a load is reading from memory: their `done` waits for the load (it frees
        # the memory); record -> [loads reading it, the `done` argument once written]
        self._reading: dict[BlockRecord, list] = {}
        self._ops: deque[tuple[bytes, Value | None]] = deque()  # None = delete
        self._cancelled: set[BlockRecord] = set()    # still in `_ops`, to be skipped
        self._taken: set[BlockRecord] = set()        # in a batch the I/O thread is writing
        self._flusher: asyncio.Task | None = None
        self.write_retry_s = write_retry_s
        self._writes_paused_until = 0.0    # monotonic time; puts are refused before it
        self._write_failure: str | None = None   # the failure being reported, until a write succeeds
        self._io = ThreadPoolExecutor(1, thread_name_prefix="kvgate-lmdb")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="kvgate-disk-read")
        self._replacing = False            # a damaged tier is being moved aside
        self._initial_map = initial_map_bytes
        self._lock_fd: int | None = None
        try:
            self._lock_fd = lock_tier(path)
            self._env = open_env(path, initial_map_bytes)
            if not still_locked(path, self._lock_fd):    # moved aside with the damaged tier
                os.close(self._lock_fd)
                self._lock_fd = lock_tier(path)
            # reader slots left by processes that died would pin old pages forever
            self.stale_readers_cleared = self._env.reader_check()
        except (OSError, lmdb.Error) as e:
            self._io.shutdown()
            self._reader.shutdown()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            raise DiskTierError(f"cannot open disk tier at {path!r}: {e}") from e
        self._max_map = max(initial_map_bytes, 2 * max_bytes + 64 * _MIB)
        self._process = DiskProcess(path, initial_map_bytes, self._max_map, [])
        self._shared: list[tuple[int, int]] = []    # (address, bytes) of the pools it maps
        # [staging_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]: slots of reads in
        # flight, and of GPU blocks waiting to be written (store/placement.py, store/loader.py)
        self.staging = BlockPool(Tier.HOST, layout, staging_blocks, "cpu", pin_memory=pin_memory, shared=True)
        for pool in (self.staging, *shared_pools):
            self._share(pool)
        self._process.start()

    @property
    def layout(self) -> BlockLayout:
        return self.format.layout

    @property
    def value_bytes(self) -> int:
        """Size of one record's value (header sizes vary by a few bytes; this bounds them)."""
        return self.format.max_bytes

    def encode(self, parent: bytes, token_bytes: bytes, depth: int, priority: int,
               payload: torch.Tensor) -> bytearray:
        """One record's value (see store/record.py)."""
        return self.format.encode(parent, token_bytes, depth, priority, payload)

    # ---- start-up scan (synchronous: runs before serving) -----------------------------------

    def scan(self) -> list[DiskEntry]:
        """Headers of every valid record, parents before children. Invalid records and
        records whose chain does not reach a first block are deleted and counted. A tier LMDB
        fails to read is moved aside and replaced by an empty one."""
        try:
            entries, bad, orphans = self._io.submit(self._walk).result()
        except lmdb.Error as e:
            self._io.submit(self._replace, f"LMDB failed reading it at start-up ({e})").result()
            return []
        if bad:
            log.warning("disk tier: dropping %d damaged or foreign records (the first: %s)", len(bad),
                        bad[0][1])
        if orphans:
            log.info("disk tier: deleting %d records whose prefix is gone", len(orphans))
        self.counters.corrupt_dropped += len(bad)
        self.counters.deletes += len(orphans)
        self._io.submit(self._delete_now, [k for k, _ in bad] + orphans).result()
        for e in entries:
            self.sizes[e.key] = e.nbytes
            self.used_bytes += e.nbytes
        return entries

    def _walk(self) -> tuple[list[DiskEntry], list[tuple[bytes, str]], list[bytes]]:
        """On the I/O thread: (valid entries in rebuild order, (key, why) of invalid records,
        keys of valid records whose prefix is gone)."""
        entries: dict[bytes, DiskEntry] = {}
        bad: list[tuple[bytes, str]] = []
        with self._env.begin(buffers=True) as txn:
            for key, value in txn.cursor():
                key = bytes(key)
                if key == MARK_KEY:
                    continue
                try:
                    h, _ = self.format.header(key, value)
                    entries[key] = DiskEntry(key, h["parent"], h["tokens"], h["depth"], h["prio"], h["t"],
                                             len(value), h["ns"])
                except CorruptValue as e:
                    bad.append((key, str(e)))
        children: dict[bytes, list[DiskEntry]] = {}
        for e in entries.values():
            children.setdefault(e.parent, []).append(e)
        ordered = [e for e in entries.values() if e.depth == 0]
        for e in ordered:  # grows while iterating: breadth-first from the first blocks
            ordered.extend(c for c in children.get(e.key, ()) if c.depth == e.depth + 1)
        reached = {e.key for e in ordered}
        return ordered, bad, [k for k in entries if k not in reached]

    def _delete_now(self, keys: list[bytes]) -> None:
        """On the I/O thread. A failure (a full disk) leaves the records to the next start's
        scan, which drops them again."""
        if keys:
            try:
                with self._env.begin(write=True) as txn:
                    for k in keys:
                        txn.delete(k)
            except lmdb.Error as e:
                log.warning("disk tier: could not delete %d invalid records: %s", len(keys), e)
                self._if_damaged(e)

    def _if_damaged(self, e: lmdb.Error) -> None:
        """Any thread: if LMDB says the file is damaged (pages it cannot read, records it cannot
        delete), move the tier aside once, on the I/O thread, and go on with an empty one: what
        it held is a miss from now on (each failed read drops its block's disk copy)."""
        if isinstance(e, _DAMAGED):
            self._damaged(f"LMDB reports it damaged while serving ({e})")

    def _damaged(self, reason: str) -> None:
        """On the loop or the I/O thread: replace the tier once, on the I/O thread (in order with
        the writes; the disk process holds reads back while it reopens)."""
        if not self._replacing:
            self._replacing = True
            self._io.submit(self._take_out, reason)

    def _take_out(self, reason: str) -> None:
        try:
            self._replace(reason)
            self.counters.replaced += 1
        except (OSError, lmdb.Error) as e:
            log.error("disk tier %s: could not be replaced (%s); its reads and writes fail from now on", self.path, e)
        finally:
            self._replacing = False

    def _replace(self, reason: str) -> None:
        """On the I/O thread: move this tier aside and open an empty one in its place."""
        self._env.close()
        quarantine(self.path, reason)
        os.close(self._lock_fd)           # it locked the copy moved aside
        self._lock_fd = lock_tier(self.path)
        self._env = open_env(self.path, self._initial_map)
        if self._process.started:
            try:
                self._process.write({"op": "reopen"})
            except DiskProcessDied as e:  # it starts again, on the new tier, at the next request
                log.warning("disk tier %s: %s", self.path, e)

    # ---- writes (queued on the loop, applied on the I/O thread) -----------------------------

    def put(self, key: bytes, value: Value) -> bool:
        """Queue a record. False (and nothing queued; a BlockRecord's `done` is not called) if
        the write queue is over budget or writes are paused after a failure; the caller must
        first make room under `max_bytes` (see `Placement`)."""
        if time.monotonic() < self._writes_paused_until:
            self.counters.writes_paused += 1
            return False
        size = self._size(value)
        if self._pending_bytes + size > self.max_pending_bytes:
            self.counters.pending_full += 1
            return False
        if key in self.sizes:
            self._forget(key)
        self.sizes[key] = size
        self.used_bytes += size
        self._pending[key] = value
        self._pending_bytes += size
        self._ops.append((key, value))
        self._kick()
        return True

    @property
    def queue_fill(self) -> float:
        """How full the write queue is, 0..1 (of `max_pending_bytes`)."""
        return self._pending_bytes / self.max_pending_bytes

    def _size(self, value: Value) -> int:
        return self.value_bytes if isinstance(value, BlockRecord) else len(value)

    def cancel(self, key: bytes, record: BlockRecord) -> bool:
        """Take back a queued put of `record` that the I/O thread has not taken and no load is
        reading; True if taken back (its `done` is never called: its memory is the caller's
        again). False: the write is under way, and `done` will come."""
        if self._pending.get(key) is not record or record in self._taken or record in self._reading:
            return False
        self._forget(key)
        self._cancelled.add(record)
        return True

    def busy(self, record: BlockRecord) -> bool:
        """Is `record` being encoded or read from memory now (so it cannot be cancelled)?"""
        return record in self._taken or record in self._reading

    def delete(self, key: bytes) -> None:
        if key in self.sizes:
            self._forget(key)
            self._ops.append((key, None))
            self._kick()

    def _forget(self, key: bytes) -> None:
        self.used_bytes -= self.sizes.pop(key)
        value = self._pending.pop(key, None)
        if value is not None:
            self._pending_bytes -= self._size(value)

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
            self._after_batch(batch, *await loop.run_in_executor(self._io, self._apply, batch))

    def make_queue_room(self, nbytes: int) -> None:
        """Write queued records now (blocking) if `nbytes` more would not fit the write queue."""
        if self._pending_bytes + nbytes > self.max_pending_bytes:
            self.flush_sync()

    def flush_sync(self) -> None:
        while self._ops:
            batch = self._take_batch()
            self._after_batch(batch, *self._io.submit(self._apply, batch).result())

    def _take_batch(self, max_bytes: int = 64 * _MIB) -> list[tuple[bytes, Value | None]]:
        """Queued operations for one transaction: everything queued, up to `max_bytes`
        (cancelled puts are skipped)."""
        batch, size = [], 0
        while self._ops and (not batch or size < max_bytes):
            op = self._ops.popleft()
            if isinstance(op[1], BlockRecord):
                if op[1] in self._cancelled:
                    self._cancelled.discard(op[1])
                    continue
                self._taken.add(op[1])
            batch.append(op)
            size += self._size(op[1]) if op[1] is not None else 0
        return batch

    def _after_batch(self, batch: list, lost: list[bytes], failure: str | None) -> None:
        for key, value in batch:
            if value is not None and self._pending.get(key) is value:
                del self._pending[key]
                self._pending_bytes -= self._size(value)
        failed = set(lost)
        # a key put again while this batch was written is in the queue anew: not lost
        lost = [k for k in lost if k in self.sizes and k not in self._pending]
        for k in lost:
            self.used_bytes -= self.sizes.pop(k)
        self.counters.write_errors += len(lost)
        for key, value in batch:
            if isinstance(value, BlockRecord):
                self._taken.discard(value)
                if value in self._reading:
                    self._reading[value][1] = key not in failed
                else:
                    value.done(key not in failed)
        self._report(batch, failure)

    def _report(self, batch: list, failure: str | None) -> None:
        """Log a write failure once, pause puts for `write_retry_s`; log the recovery."""
        if failure is not None:
            self._writes_paused_until = time.monotonic() + self.write_retry_s
            if self._write_failure is None:
                log.error("disk tier %s: writes failing (%s); refusing new writes for %g s at a time "
                          "until one succeeds (counted in kvgate_disk_operations_total)", self.path, failure,
                          self.write_retry_s)
            self._write_failure = failure
        elif self._write_failure is not None and any(v is not None for _, v in batch):
            log.warning("disk tier %s: writes succeed again", self.path)
            self._write_failure = None

    def _apply(self, batch: list[tuple[bytes, Value | None]]) -> tuple[list[bytes], str | None]:
        """Runs on the I/O thread: the writer process encodes the batch's blocks and applies it
        in one transaction. Returns the keys whose puts were lost and why; never raises."""
        if any(isinstance(v, BlockRecord) for _, v in batch):
            self.payload_ready()
        ops, lost = [], []
        for key, value in batch:
            op = [key] if value is None else self._op(key, value)
            if op is None:
                lost.append(key)
            else:
                ops.append(op)
        try:
            reply = self._process.write({"op": "write", "ops": ops})
        except DiskProcessDied as e:
            return [k for k, v in batch if v is not None], str(e)
        self.counters.writes += reply["writes"]
        self.counters.deletes += reply["deletes"]
        self.counters.map_resizes += reply["map_resizes"]
        if reply["damaged"]:
            self._damaged(f"LMDB reports it damaged while serving ({reply['failure']})")
        return lost + reply["lost"], reply["failure"]

    def _op(self, key: bytes, value: Value) -> list | None:
        """The writer's operation for a put: a record to encode from shared memory, or the encoded
        bytes (payloads outside the shared pools: tests). None (logged) if it cannot be encoded."""
        if not isinstance(value, BlockRecord):
            return [key, value]
        try:
            where = self._shared_at(value.payload)
            if where is None:
                return [key, self.format.encode(value.parent, value.token_bytes, value.depth,
                                                value.priority, value.payload, value.namespace)]
            return [key, self.format.fields(value.parent, value.token_bytes, value.depth, value.priority,
                                            value.namespace), *where, self.layout.block_bytes]
        except (OverflowError, ValueError) as e:   # the store refuses such priorities first
            log.error("disk tier: block %s cannot be encoded (%s); not written", key.hex(), e)
            return None

    def _share(self, pool: BlockPool) -> None:
        """Let the writer process read blocks of `pool` (a shared one) where they are: records whose
        payload is a row of `pool.bytes` are encoded there, not copied through the socket."""
        if pool.fd is None:
            return
        self._shared.append((pool.bytes.ctypes.data, pool.bytes.nbytes))
        self._process.regions.append((pool.fd, pool.bytes.nbytes))

    def _shared_at(self, payload) -> tuple[int, int] | None:
        """(region, offset) of `payload` if it lies in a shared pool."""
        if not isinstance(payload, np.ndarray):
            return None
        address = payload.ctypes.data
        for region, (base, size) in enumerate(self._shared):
            if base <= address and address + payload.nbytes <= base + size:
                return region, address - base
        return None

    # ---- reads ------------------------------------------------------------------------------

    async def load(self, items: list[tuple[bytes, bytes, bytes]], pool: BlockPool | None = None,
                   slots: list[int] | None = None) -> list[bool]:
        """Read and verify records `(key, parent, token_bytes)`; record i's payload lands in slot
        `slots[i]` of `pool` (a shared pool), or nowhere (no pool: read and verify only). Returns
        which succeeded; failed records are deleted and counted. A slot whose record failed holds
        garbage."""
        block = self.layout.block_bytes
        region = None if pool is None else self._shared_at(pool.bytes)[0]
        reading, ops = [], []
        for i, (key, _, _) in enumerate(items):
            queued, src = self._pending.get(key), None
            if isinstance(queued, BlockRecord):            # not written yet: from memory
                where = self._shared_at(queued.payload)
                if where is None:
                    src = bytes(self.format.encode(queued.parent, queued.token_bytes, queued.depth,
                                                   queued.priority, queued.payload, queued.namespace))
                else:
                    src = [*where, block]
                    reading.append(queued)
            elif queued is not None:
                src = bytes(queued)
            ops.append([key, None if pool is None else [region, slots[i] * block, block], src])
        for v in reading:
            self._reading.setdefault(v, [0, None])[0] += 1
        try:
            reply = await asyncio.get_running_loop().run_in_executor(self._reader, self._read, ops)
        finally:
            for v in reading:
                entry = self._reading[v]
                entry[0] -= 1
                if entry[0] == 0:
                    del self._reading[v]
                    if entry[1] is not None:     # written meanwhile: its memory may go now
                        v.done(entry[1])
        self.counters.reads += len(items)
        if reply["failure"] is not None:
            log.error("disk tier: read failed: %s", reply["failure"])
        if reply["damaged"]:
            self._damaged(f"LMDB reports it damaged while serving ({reply['failure']})")
        ok = []
        for (key, parent, tokens), result in zip(items, reply["results"]):
            try:
                ok.append(result is True or (result is not None and self.format.check(key, *result, parent, tokens)))
            except CorruptValue as e:
                log.warning("disk tier: record %s is not served: %s", key.hex(), e)
                self.counters.corrupt_dropped += 1
                self.delete(key)
                ok.append(False)
        return ok

    def _read(self, ops: list[list]) -> dict:
        """On the reader thread."""
        self.payload_ready()      # copies queued into host memory (the read's slots, too) have landed
        try:
            return self._process.read(ops)
        except DiskProcessDied as e:
            return {"results": [None] * len(ops), "failure": str(e), "damaged": False}

    # ---- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Write what is queued, sync, close, and mark the tier closed cleanly (the next start
        need not walk it in a child process). Call `await flush()` first inside a loop."""
        if self._io is None:
            return
        self.flush_sync()
        self._reader.shutdown()
        self._io.submit(self._close_env).result()
        self._io.shutdown()
        self._io = None

    def _close_env(self) -> None:
        self._process.close()
        try:
            self._env.sync(True)
            clean = True
        except lmdb.Error as e:          # a full disk: the next start walks the file first
            log.error("disk tier %s: final sync failed: %s", self.path, e)
            clean = False
        self._env.close()
        if clean:
            mark_clean(self.path)
        os.close(self._lock_fd)           # releases the lock

    def check_integrity(self) -> None:
        assert self.used_bytes == sum(self.sizes.values()), "disk bytes drifted"
        assert self._pending_bytes == sum(self._size(v) for v in self._pending.values())
        assert all(k in self.sizes for k in self._pending), "pending record not accounted"
