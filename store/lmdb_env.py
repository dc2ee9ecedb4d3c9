"""Opening the disk tier's LMDB environment defensively.

A directory that is not a healthy kvgate tier — data.mdb truncated, zeroed or garbled, a B-tree
LMDB cannot walk, another program's database — is moved aside (kept for inspection, logged
once) and an empty tier is started in its place: the server always starts. LMDB trusts its file:
a truncated one faults (SIGBUS) on the first read of a missing page, a zeroed one trips an
assertion (SIGABRT). So the checks come before LMDB touches the file, cheapest first:

1. The two meta pages of data.mdb, read as bytes: magic, version, page size, and a file at
   least as long as the newest meta page says it is.
2. After an unclean shutdown (no clean-close mark matching the file as it is now), a child
   process opens the environment and walks every record: a tree broken enough to crash LMDB
   kills the child, not the server. A clean close writes the mark (`mark_clean`).
3. In process: LMDB opens it, and it holds kvgate's mark record (a non-empty database without
   it is another program's).
Errors while the tier is scanned later (lmdb.Error) also move it aside (`DiskTier.scan`).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time

import lmdb

log = logging.getLogger("kvgate.store.disk")

MARK_KEY = b"kvgate-disk-tier"        # never a block key: those are 16 bytes
MARK_VALUE = b"kvgate disk tier: KV blocks, see store/record.py"
CLEAN_FILE = "kvgate-clean"           # beside data.mdb: its size, mtime and inode at a clean close
LOCK_FILE = "kvgate.lock"             # beside data.mdb: held (flock) by the one process using the tier
_LMDB_MAGIC = 0xBEEFC0DE
# LMDB 0.9's meta page on a 64-bit build: a 16-byte page header, then MDB_meta (magic, version,
# address, map size, two MDB_db records of 48 bytes whose first holds the page size in md_pad,
# last page number, transaction id)
_META = struct.Struct("<16xII8x8xI44x48xQQ")

# The child's walk: open read-only without the lock file, touch the first page of every value.
_PROBE = """
import sys, lmdb
env = lmdb.open(sys.argv[1], readonly=True, lock=False, subdir=True, max_dbs=0)
with env.begin(buffers=True) as txn:
    n = sum(1 for key, value in txn.cursor() if len(value) == 0 or value[0] >= 0)
print(n)
"""


class TierInUse(OSError):
    """Another process holds the tier's lock."""


def lock_tier(path: str) -> int:
    """Take the tier's lock (created with the directory if missing) before LMDB or the checks
    touch it: one process per tier, so no second server moves a live tier aside. Returns the
    file descriptor that holds it; raises TierInUse."""
    os.makedirs(path, exist_ok=True)
    fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise TierInUse(f"{path} is in use by another process (it holds {LOCK_FILE})") from None
    return fd


def still_locked(path: str, fd: int) -> bool:
    """Does `fd` still lock the tier at `path` (not a copy moved aside by `quarantine`)?"""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(os.path.join(path, LOCK_FILE)))
    except OSError:
        return False


def open_env(path: str, map_size: int) -> lmdb.Environment:
    """The environment at `path` (created if missing), healthy and marked as kvgate's.
    Raises OSError if the directory cannot be made or moved aside, lmdb.Error if even a fresh
    environment cannot be opened there."""
    os.makedirs(path, exist_ok=True)
    problem = check_file(path) or (None if _closed_cleanly(path) else _probe(path))
    if problem:
        quarantine(path, problem)
    env = None
    try:
        env = _open(path, map_size)
        problem = _check_mark(env)
    except lmdb.Error as e:
        problem = f"LMDB cannot open it ({e})"
    if problem:
        if env is not None:
            env.close()
        quarantine(path, problem)
        env = _open(path, map_size)
        _check_mark(env)
    return env


def _open(path: str, map_size: int) -> lmdb.Environment:
    return lmdb.open(path, map_size=map_size, subdir=True, sync=False, metasync=False,
                     readahead=False, max_dbs=0)


def check_file(path: str) -> str | None:
    """What is wrong with data.mdb's meta pages (None: nothing, or no file yet)."""
    for name in ("data.mdb", "lock.mdb"):
        if os.path.lexists(os.path.join(path, name)) and not os.path.isfile(os.path.join(path, name)):
            return f"{name} is not a regular file"
    if lmdb.version()[:2] != (0, 9):      # another on-disk format: leave the checks to the probe
        return None
    data = os.path.join(path, "data.mdb")
    try:
        size = os.path.getsize(data)
        with open(data, "rb") as f:
            head = f.read(2 * 65536)
    except FileNotFoundError:
        return None
    if size == 0:
        return None                       # LMDB initializes an empty file
    if size < _META.size:
        return f"data.mdb is {size} bytes: too short for an LMDB file"
    magic, version, page_size, _, _ = _META.unpack_from(head, 0)
    if magic != _LMDB_MAGIC or version != 1 or page_size not in (1 << k for k in range(9, 17)):
        return "data.mdb is not an LMDB file (bad magic, version or page size in its first meta page)"
    if size < 2 * page_size:
        return f"data.mdb is {size} bytes: shorter than its two meta pages"
    metas = [_META.unpack_from(head, 0), _META.unpack_from(head, page_size)]
    if any(m[0] != _LMDB_MAGIC or m[1] != 1 for m in metas):
        return "data.mdb's second meta page is damaged"
    *_, last_page, _ = max(metas, key=lambda m: m[4])       # the newest transaction's meta
    if size < (last_page + 1) * page_size:
        return f"data.mdb is truncated: {size} bytes, its newest meta page needs {(last_page + 1) * page_size}"
    return None


def _file_identity(path: str) -> list[int] | None:
    try:
        st = os.stat(os.path.join(path, "data.mdb"))
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def mark_clean(path: str) -> None:
    """Record that the environment at `path` was closed cleanly, as its data.mdb is now."""
    identity = _file_identity(path)
    if identity is None:
        return
    tmp = os.path.join(path, CLEAN_FILE + ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(identity, f)
        os.replace(tmp, os.path.join(path, CLEAN_FILE))
    except OSError as e:                  # a full disk: the next start probes the file
        log.warning("disk tier %s: cannot write the clean-close mark: %s", path, e)


def _closed_cleanly(path: str) -> bool:
    identity = _file_identity(path)
    if identity is None:
        return True                       # nothing to probe
    try:
        with open(os.path.join(path, CLEAN_FILE)) as f:
            return json.load(f) == identity
    except (OSError, ValueError):
        return False


PROBE_TIMEOUT_S = 600      # a walk that takes longer (a stalled disk) moves the tier aside: start-up goes on


def _probe(path: str) -> str | None:
    """Walk the environment in a child process; what went wrong, or None."""
    log.info("disk tier %s was not closed cleanly: walking it in a child process (at most %d s)", path,
             PROBE_TIMEOUT_S)
    try:
        done = subprocess.run([sys.executable, "-I", "-c", _PROBE, path], capture_output=True, text=True,
                              timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"walking it in a child process took over {PROBE_TIMEOUT_S} s"
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        return f"LMDB crashed walking it ({signal.Signals(-done.returncode).name})"
    last = (done.stderr.strip().splitlines() or ["no message"])[-1]
    return f"LMDB cannot walk it ({last})"


def _check_mark(env: lmdb.Environment) -> str | None:
    """None if the environment is kvgate's (marking it if it is empty), else the problem."""
    with env.begin(write=True) as txn:
        mark = txn.get(MARK_KEY)
        if mark is None and txn.stat()["entries"] == 0:
            txn.put(MARK_KEY, MARK_VALUE)
            return None
    if mark != MARK_VALUE:
        return "it holds another program's database (no kvgate mark)"
    return None


def quarantine(path: str, reason: str) -> str:
    """Move the tier at `path` aside and leave an empty directory there; returns where it went."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = f"{os.path.normpath(path)}.bad-{stamp}"
    n = 1
    while os.path.exists(aside):
        n += 1
        aside = f"{os.path.normpath(path)}.bad-{stamp}-{n}"
    try:
        os.rename(path, aside)
        os.makedirs(path)
    except OSError:      # a mount point, or a parent we may not write: move the files inside
        aside = os.path.join(path, os.path.basename(aside))
        os.makedirs(aside)
        for name in ("data.mdb", "lock.mdb", CLEAN_FILE):
            if os.path.exists(os.path.join(path, name)):
                os.rename(os.path.join(path, name), os.path.join(aside, name))
    log.error("disk tier %s: %s; moved it to %s and started an empty tier", path, reason, aside)
    return aside
