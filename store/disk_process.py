"""The disk tier's process: every LMDB read and write while serving, off the engine's interpreter.

Why a process: a Python thread beside the busy engine loop waits for the interpreter lock each
time it takes it back, and a block gives it up several times (checksum, copy, put, commit). On
the CPU, beside a thread that runs Python without pause, a writer thread managed 21 blocks/s
against 209 alone, and reader threads 197 blocks/s against 1,341 (docs/store.md). This process
has an interpreter of its own. It maps the pools blocks move through (the host tier and the disk
staging area: `BlockPool(shared=True)`, anonymous shared memory passed as file descriptors),
encodes and writes blocks from them, and reads records into them, checksumming what it copied.
It opens the same LMDB environment as the engine's process (which checks, scans and replaces
it: store/lmdb_env.py, store/disk.py); LMDB serializes writers across processes. It imports no
torch and nothing from kvgate (it starts in a fraction of a second); `pack_value`, the record's
byte layout (store/record.py), lives here so that both sides use the one copy.

Two sockets (`multiprocessing.connection` framing, msgpack bodies), each used by one thread of
the engine's process, one request and one reply at a time:
- writes (the disk tier's I/O thread):
    {"op": "write", "ops": [op, ...]} -> {"lost": [key], "failure": str | None, "damaged": bool,
                                          "writes": n, "deletes": n, "map_resizes": n}
        op = [key]                              delete
           | [key, value]                       put an encoded record
           | [key, header, region, offset, n]   encode the record (header fields but "sum") from
                                                the n bytes at `offset` of a shared region
    {"op": "reopen"} -> {}     the engine's process moved a damaged tier aside: open the new one
    {"op": "close"} -> {}      sync, close, exit
- reads (the disk tier's reader thread):
    {"items": [[key, dst, src], ...]} -> {"results": [result, ...], "failure": str | None,
                                          "damaged": bool}
        dst = [region, offset, n] where the payload goes, or None (read and checksum only)
        src = None (from LMDB) | an encoded record's bytes (queued, not written yet)
            | [region, offset, n] (a queued block still in shared memory: copied, not checked)
        result = None (no record) | True (copied from shared memory)
               | [head, value length, xxh3 of the payload copied (None if its length is wrong)]
      The engine's process checks each head (store/record.py) before it marks anything loaded.
The process exits when the write socket closes (its parent died), and ignores SIGINT (the
parent, which shares its terminal, flushes and closes it on shutdown).
"""
from __future__ import annotations

import contextlib
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection

import lmdb
import msgpack
import numpy as np
import xxhash

PREFIX = struct.Struct("<IQ")     # header length, header checksum
READ_THREADS = 4                  # concurrent LMDB readers per read request
_DAMAGED = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.PanicError, lmdb.InvalidError)


def pack_value(header: dict, data: memoryview | np.ndarray) -> bytearray:
    """A record's value: u32 header length | u64 xxh3 of the header | msgpack header | payload.
    Adds the payload's checksum to `header` ("sum"). OverflowError for an integer past 64 bits."""
    data = np.frombuffer(data, np.uint8)
    header["sum"] = xxhash.xxh3_64_intdigest(data)
    packed = msgpack.packb(header)
    start = PREFIX.size + len(packed)
    value = bytearray(start + data.nbytes)
    PREFIX.pack_into(value, 0, len(packed), xxhash.xxh3_64_intdigest(packed))
    value[PREFIX.size:start] = packed
    np.frombuffer(value, np.uint8, offset=start)[:] = data     # numpy copies without the interpreter lock
    return value


def open_env(path: str, map_size: int) -> lmdb.Environment:
    """The environment as the engine's process opens it (store/lmdb_env.py), after its checks."""
    return lmdb.open(path, map_size=map_size, subdir=True, sync=False, metasync=False,
                     readahead=False, max_dbs=0)


class DiskProcessDied(Exception):
    """The disk process is gone (killed, or out of memory): the request it had is lost."""


class DiskProcess:
    """The engine process's handle on the disk process: `start` it (it gets ready while the
    caller goes on); a request after it died starts another. `write` and `read` may run on two
    threads at once, each on its own socket; neither on two."""

    def __init__(self, path: str, map_size: int, max_map: int, regions: list[tuple[int, int]]) -> None:
        self.path = path
        self.map_size = map_size
        self.max_map = max_map
        self.regions = regions            # (file descriptor, bytes) of each shared pool
        self._lock = threading.Lock()     # starting and stopping
        self._proc: subprocess.Popen | None = None
        self._conns: tuple[Connection, Connection] | None = None    # writes, reads

    @property
    def started(self) -> bool:
        return self._proc is not None

    def write(self, request: dict) -> dict:
        return self._call(0, request)

    def read(self, items: list[list]) -> dict:
        return self._call(1, {"items": items})

    def _call(self, which: int, request: dict) -> dict:
        with self._lock:
            if self._proc is None:
                self._start()
            proc, conn = self._proc, self._conns[which]
        try:
            conn.send_bytes(msgpack.packb(request))
            return msgpack.unpackb(conn.recv_bytes())
        except (EOFError, OSError) as e:
            code = self._stop(proc)
            raise DiskProcessDied(f"the disk process ended (exit status {code}): {e or 'no reply'}") from None

    def start(self) -> None:
        with self._lock:
            self._start()

    def _start(self) -> None:
        pairs = [socket.socketpair() for _ in range(2)]
        theirs = [b for _, b in pairs]
        args = [*(str(s.fileno()) for s in theirs), self.path, str(self.map_size), str(self.max_map),
                *(f"{fd}:{n}" for fd, n in self.regions)]
        try:
            self._proc = subprocess.Popen([sys.executable, "-P", os.path.abspath(__file__), *args],
                                          pass_fds=[*(s.fileno() for s in theirs), *(fd for fd, _ in self.regions)],
                                          stdin=subprocess.DEVNULL)
        finally:
            for s in theirs:
                s.close()
        self._conns = tuple(Connection(a.detach()) for a, _ in pairs)

    def _stop(self, proc: subprocess.Popen | None = None) -> int | None:
        """Close the sockets of `proc` (the current process by default) and reap it; its exit
        status."""
        with self._lock:
            if self._proc is None or (proc is not None and proc is not self._proc):
                return proc.poll() if proc is not None else None
            proc, conns, self._proc, self._conns = self._proc, self._conns, None, None
        for conn in conns:
            conn.close()
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def close(self) -> None:
        """Sync and close the process's environment, and wait for it to end."""
        if self._proc is not None:
            try:
                self.write({"op": "close"})
            except DiskProcessDied:
                pass
            self._stop()


# ---- the disk process ------------------------------------------------------------------------

class Disk:
    """The process's side: the environment, the shared pools, the write path and the read path.

    Growing LMDB's map remaps the file under every read transaction open in this process
    (reads then fail or crash), and so does replacing the environment: both wait for the reads
    in progress, and new reads wait for them (`_remapping`, `_reading`)."""

    def __init__(self, path: str, map_size: int, max_map: int, regions: list[tuple[int, int]]) -> None:
        self.path = path
        self.map_size = map_size
        self.max_map = max_map
        self.env = open_env(path, map_size)
        # each shared pool as bytes
        self.regions = [np.frombuffer(mmap.mmap(fd, n), np.uint8) for fd, n in regions]
        self._readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="kvgate-disk-read")
        self._map_lock = threading.Condition()
        self._reads = 0                   # read transactions open
        self._remapping = False

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        with self._map_lock:
            self._map_lock.wait_for(lambda: not self._remapping)
            self._reads += 1
        try:
            yield
        finally:
            with self._map_lock:
                self._reads -= 1
                self._map_lock.notify_all()

    @contextlib.contextmanager
    def _remap(self) -> Iterator[None]:
        with self._map_lock:
            self._remapping = True
            self._map_lock.wait_for(lambda: self._reads == 0)
        try:
            yield
        finally:
            with self._map_lock:
                self._remapping = False
                self._map_lock.notify_all()

    # ---- writes (one thread) -----------------------------------------------------------------

    def write(self, ops: list[list]) -> dict:
        """Encode and apply `ops` in one transaction; MapFullError grows the map and retries."""
        values, lost = [], []
        for op in ops:
            if len(op) == 5:
                key, header, region, offset, size = op
                try:
                    op = [key, pack_value(header, self.regions[region][offset:offset + size])]
                except (OverflowError, ValueError) as e:
                    print(f"kvgate disk process: block {key.hex()} cannot be encoded ({e}); not written",
                          file=sys.stderr)
                    lost.append(key)
                    continue
            values.append(op)
        reply = {"lost": lost, "failure": None, "damaged": False, "writes": 0, "deletes": 0, "map_resizes": 0}
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for op in values:
                        txn.put(op[0], op[1]) if len(op) == 2 else txn.delete(op[0])
                reply["writes"] = sum(len(op) == 2 for op in values)
                reply["deletes"] = len(values) - reply["writes"]
                return reply
            except lmdb.MapFullError:
                size = self.env.info()["map_size"]
                if size >= self.max_map:
                    reply["failure"] = f"LMDB map full at its limit of {size >> 20} MiB"
                    break
                with self._remap():
                    self.env.set_mapsize(min(2 * size, self.max_map))
                reply["map_resizes"] += 1
            except lmdb.Error as e:
                reply["failure"], reply["damaged"] = str(e), isinstance(e, _DAMAGED)
                break
        reply["lost"] = lost + [op[0] for op in values if len(op) == 2]
        deletes = [op[0] for op in values if len(op) == 1]
        try:                       # deletes free space: they may pass
            if deletes:
                with self.env.begin(write=True) as txn:
                    for key in deletes:
                        txn.delete(key)
                reply["deletes"] = len(deletes)
        except lmdb.Error:
            pass                   # left to the next start's scan
        return reply

    def reopen(self) -> None:
        with self._remap():
            self.env.close()
            self.env = open_env(self.path, self.map_size)

    def close(self) -> None:
        with self._remap():
            try:
                self.env.sync(True)
            finally:
                self.env.close()

    # ---- reads (split over the reader threads) -------------------------------------------------

    def read(self, items: list[list]) -> dict:
        share = -(-len(items) // READ_THREADS) or 1
        parts = list(self._readers.map(lambda first: self._read(items[first:first + share]),
                                       range(0, len(items), share)))
        failures = [p for p in parts if p[1] is not None]
        return {"results": [r for results, _, _ in parts for r in results],
                "failure": failures[0][1] if failures else None, "damaged": any(d for _, _, d in parts)}

    def _read(self, items: list[list]) -> tuple[list, str | None, bool]:
        results: list = []
        try:
            with self._reading(), self.env.begin(buffers=True) as txn:
                for key, dst, src in items:
                    results.append(self._read_one(txn, key, dst, src))
        except lmdb.Error as e:    # the environment failed: what was not read is a miss
            return results + [None] * (len(items) - len(results)), str(e), isinstance(e, _DAMAGED)
        return results, None, False

    def _read_one(self, txn: lmdb.Transaction, key: bytes, dst: list | None, src) -> list | bool | None:
        if isinstance(src, list):                  # queued, still in shared memory: trusted
            region, offset, n = src
            self._copy(dst, self.regions[region][offset:offset + n])
            return True
        value = memoryview(src) if src is not None else txn.get(key)
        if value is None:
            return None
        start = PREFIX.size + (PREFIX.unpack_from(value, 0)[0] if len(value) >= PREFIX.size else 0)
        head = bytes(value[:start])
        payload = np.frombuffer(value, np.uint8)[min(start, len(value)):]
        if dst is None:
            return [head, len(value), xxhash.xxh3_64_intdigest(payload)]
        if payload.nbytes != dst[2]:
            return [head, len(value), None]
        copied = self._copy(dst, payload)          # page faults happen here, without the interpreter lock
        return [head, len(value), xxhash.xxh3_64_intdigest(copied)]   # the checksum of what is served

    def _copy(self, dst: list | None, payload: np.ndarray) -> np.ndarray | None:
        if dst is None:
            return None
        region, offset, n = dst
        target = self.regions[region][offset:offset + n]
        target[:] = payload
        return target


def _serve_reads(conn: Connection, disk: Disk) -> None:
    while True:
        try:
            request = msgpack.unpackb(conn.recv_bytes())
        except (EOFError, OSError):
            return
        conn.send_bytes(msgpack.packb(disk.read(request["items"])))


def main(argv: list[str]) -> None:
    # A terminal's Ctrl-C and a supervisor's SIGTERM reach the whole process group (systemd,
    # `timeout`): this process goes on writing what the engine process sends while it persists,
    # and ends when that one closes its end of the sockets (or dies).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # past a file-size limit: an error, not death
    writes, reads = Connection(int(argv[0])), Connection(int(argv[1]))
    regions = [tuple(int(x) for x in r.split(":")) for r in argv[5:]]
    disk = Disk(argv[2], int(argv[3]), int(argv[4]), regions)
    threading.Thread(target=_serve_reads, args=(reads, disk), daemon=True).start()
    while True:
        try:
            request = msgpack.unpackb(writes.recv_bytes())
        except (EOFError, OSError):
            disk.close()
            return
        reply = {}
        if request["op"] == "write":
            reply = disk.write(request["ops"])
        elif request["op"] == "reopen":
            disk.reopen()
        elif request["op"] == "close":
            disk.close()
            writes.send_bytes(msgpack.packb(reply))
            return
        writes.send_bytes(msgpack.packb(reply))


if __name__ == "__main__":
    main(sys.argv[1:])
