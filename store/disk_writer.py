"""The disk tier's writer process: it encodes queued blocks and writes them to LMDB.

Why a process: a Python thread beside the busy engine loop waits for the interpreter lock every
time it takes it back, and a block's write gives it up four times (checksum, copy, put, commit):
on the CPU a writer thread managed 21 blocks/s beside a busy thread against 209 alone
(docs/store.md). This process has an interpreter of its own. It maps the pools it writes from
(host tier and disk staging: `BlockPool(shared=True)`, anonymous shared memory passed as file
descriptors) and opens the same LMDB environment; LMDB serializes writers across processes,
readers never block. It runs no torch (it starts in a fraction of a second).

Protocol, over a socket (`multiprocessing.connection` framing, msgpack bodies), one request at a
time from the parent's I/O thread, one reply each:
  {"op": "write", "ops": [op, ...]}  ->  {"lost": [key, ...], "failure": str | None, "damaged": bool,
                                          "writes": n, "deletes": n, "map_resizes": n}
      op = [key]                              delete
         | [key, value]                       put an encoded record
         | [key, header, region, offset, n]   encode the record (header fields without "sum")
                                              from the n bytes at `offset` of a shared region
  {"op": "reopen"} -> {}          (the parent moved a damaged tier aside and opened a new one)
  {"op": "close"}  -> {}          sync, close, exit
The process exits when the socket closes (its parent died) and ignores SIGINT (the parent, which
shares its terminal, flushes and closes it on shutdown).

This file is run as a script and imports nothing from kvgate; `pack_value` (the record's byte
layout, store/record.py) lives here so that both sides use the one copy.
"""
from __future__ import annotations

import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
from multiprocessing.connection import Connection

import lmdb
import msgpack
import numpy as np
import xxhash

PREFIX = struct.Struct("<IQ")     # header length, header checksum
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
    """The environment as the parent opens it (store/lmdb_env.py), after its checks."""
    return lmdb.open(path, map_size=map_size, subdir=True, sync=False, metasync=False,
                     readahead=False, max_dbs=0)


class WriterDied(Exception):
    """The writer process is gone (killed, or out of memory): the batch it had is lost."""


class WriterProcess:
    """The parent's handle on the writer process: `start` it (it gets ready while the caller goes
    on); a request after it died starts another. Call it from one thread at a time (the disk
    tier's I/O thread)."""

    def __init__(self, path: str, map_size: int, max_map: int, regions: list[tuple[int, int]]) -> None:
        self.path = path
        self.map_size = map_size
        self.max_map = max_map
        self.regions = regions            # (file descriptor, bytes) of each shared pool
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None

    @property
    def started(self) -> bool:
        return self._proc is not None

    def call(self, request: dict) -> dict:
        if self._proc is None:
            self.start()
        try:
            self._conn.send_bytes(msgpack.packb(request))
            return msgpack.unpackb(self._conn.recv_bytes())
        except (EOFError, OSError) as e:
            code = self._stop()
            raise WriterDied(f"the disk writer process ended (exit status {code}): {e or 'no reply'}") from None

    def start(self) -> None:
        ours, theirs = socket.socketpair()
        fds = [theirs.fileno(), *(fd for fd, _ in self.regions)]
        args = [str(theirs.fileno()), self.path, str(self.map_size), str(self.max_map),
                *(f"{fd}:{n}" for fd, n in self.regions)]
        try:
            self._proc = subprocess.Popen([sys.executable, "-P", os.path.abspath(__file__), *args],
                                          pass_fds=fds, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())

    def _stop(self) -> int | None:
        """Close the socket and reap the process; its exit status."""
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if conn is not None:
            conn.close()
        if proc is None:
            return None
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def close(self) -> None:
        """Sync and close the writer's environment, and wait for the process to end."""
        if self._proc is not None:
            try:
                self.call({"op": "close"})
            except WriterDied:
                pass
            self._stop()


# ---- the writer process ---------------------------------------------------------------------

class _Writer:
    def __init__(self, path: str, map_size: int, max_map: int, regions: list[tuple[int, int]]) -> None:
        self.path = path
        self.map_size = map_size
        self.max_map = max_map
        self.env = open_env(path, map_size)
        # each shared pool, read-only: [bytes]
        self.regions = [np.frombuffer(mmap.mmap(fd, n, prot=mmap.PROT_READ), np.uint8) for fd, n in regions]

    def write(self, ops: list[list]) -> dict:
        """Encode and apply `ops` in one transaction; MapFullError grows the map and retries."""
        values, lost = [], []
        for op in ops:
            if len(op) == 5:
                key, header, region, offset, size = op
                try:
                    op = [key, pack_value(header, self.regions[region][offset:offset + size])]
                except (OverflowError, ValueError) as e:
                    print(f"kvgate disk writer: block {key.hex()} cannot be encoded ({e}); not written",
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
                self.env.set_mapsize(min(2 * size, self.max_map))     # no transaction is open here
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
        self.env.close()
        self.env = open_env(self.path, self.map_size)

    def close(self) -> None:
        try:
            self.env.sync(True)
        finally:
            self.env.close()


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(int(argv[0]))
    regions = [tuple(int(x) for x in r.split(":")) for r in argv[4:]]
    writer = _Writer(argv[1], int(argv[2]), int(argv[3]), regions)
    while True:
        try:
            request = msgpack.unpackb(conn.recv_bytes())
        except EOFError:
            writer.close()
            return
        reply = {}
        if request["op"] == "write":
            reply = writer.write(request["ops"])
        elif request["op"] == "reopen":
            writer.reopen()
        elif request["op"] == "close":
            writer.close()
            conn.send_bytes(msgpack.packb(reply))
            return
        conn.send_bytes(msgpack.packb(reply))


if __name__ == "__main__":
    main(sys.argv[1:])
