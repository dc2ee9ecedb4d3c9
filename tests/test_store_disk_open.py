"""The disk tier opens whatever is in its directory: a truncated, zeroed, garbled or bit-flipped
data.mdb, or another program's LMDB, is moved aside (kept, logged once) and an empty tier starts
in its place; the server always starts. Every header field the start-up scan trusts is covered
by a checksum. Write failures are logged once, pause the writes, and recover."""
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import textwrap

import lmdb
import msgpack
import pytest
import torch

from store import Tier, lmdb_env
from store.disk import BlockRecord, DiskTier
from store.keys import chain_key
from store.lmdb_env import CLEAN_FILE, MARK_KEY
from store.record import _PREFIX, RecordFormat
from tests.conftest import FINGERPRINT, LAYOUT, child_env, make_store, run_request, write_kv
from tests.test_store_disk import edit_records, fill_disk, prompt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# In a child process: a crash inside LMDB (SIGBUS, SIGABRT, SIGSEGV) fails the test instead of
# killing pytest. For each damaged directory: open a store there, check that the tier in use
# works (write, persist, restart), print what it found.
OPENER = textwrap.dedent("""
    import asyncio, json, os, pathlib, sys
    from tests.conftest import make_store, run_request
    from tests.test_store_disk import prompt

    async def main(root):
        store = make_store(root, gpu=3, host=3, disk_blocks=4000)
        restored = store.index.num_nodes
        for i in range(1, 4):
            run_request(store, 5000 + i, prompt(5000 + i))
        store.persist()
        await store.flush()
        store.close()
        again = make_store(root, gpu=3, host=3, disk_blocks=4000)
        print(json.dumps({"restored": restored, "after_restart": again.index.num_nodes,
                          "entries": sorted(os.listdir(root))}), flush=True)
        again.close()
    for root in sys.argv[1:]:
        asyncio.run(main(pathlib.Path(root)))
""")


def open_in_child(roots: list) -> tuple[list[dict], str]:
    done = subprocess.run([sys.executable, "-c", OPENER, *map(str, roots)], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0, f"the opener died ({done.returncode}) at {roots[len(results)]}: " \
                                 f"{done.stderr[-2000:]}"
    return results, done.stderr


def damage(root, how: str, seed: int = 0) -> bytes:
    data = root / "kv" / "data.mdb"
    b = bytearray(data.read_bytes())
    if how == "truncated":
        b = b[:len(b) // 2]
    elif how == "zeros":
        b = bytearray(len(b))
    elif how == "garbage":
        b = bytearray(random.Random(seed).randbytes(len(b)))
    elif how == "bitflips":       # in page headers past the two meta pages: the B-tree itself
        rng = random.Random(seed)
        for _ in range(6):
            page = rng.randrange(2, len(b) // 4096)
            b[page * 4096 + rng.randrange(16)] ^= 1 << rng.randrange(8)
    data.write_bytes(bytes(b))
    return bytes(b)


@pytest.fixture(scope="module")
def filled(tmp_path_factory) -> str:
    """A disk tier of 900 records (branch and overflow pages), closed cleanly."""
    root = tmp_path_factory.mktemp("filled")
    store = make_store(root, gpu=3, host=3, disk_blocks=4000)
    for i in range(1, 301):
        seq = store.admit(i, store.root_key(), prompt(i))
        write_kv(store, seq, prompt(i))
        store.commit(i, prompt(i))
        store.release(i)
        store.disk.flush_sync()          # time passes: the writes land before the host tier turns over
    store.persist()
    store.close()
    return str(root / "kv")


DAMAGE = [("truncated", 0), ("zeros", 0), ("garbage", 0), ("bitflips", 0), ("bitflips", 1), ("bitflips", 3)]


async def test_damaged_tiers_are_moved_aside_and_the_store_starts(tmp_path, filled):
    roots, damaged = [], []
    for how, seed in DAMAGE:
        root = tmp_path / f"{how}-{seed}"
        shutil.copytree(filled, root / "kv")
        damaged.append(damage(root, how, seed))
        roots.append(root)
    results, log = open_in_child(roots)
    assert log.count("moved it to") == sum(1 for r in results if len(r["entries"]) > 1)   # once each
    for (how, _), root, bad, out in zip(DAMAGE, roots, damaged, results):
        aside = [e for e in out["entries"] if e.startswith("kv.bad-")]
        assert out["after_restart"] == out["restored"] + 9, how   # the tier in use works and persists
        if how != "bitflips":
            assert len(aside) == 1 and out["restored"] == 0, f"{how}: LMDB must never open that file"
        if aside:                               # moved aside and kept as it was
            assert (root / aside[0] / "data.mdb").read_bytes() == bad
        else:                                   # flips LMDB walks past: each record is checked
            assert out["restored"] <= 900


async def test_another_programs_database_is_moved_aside_untouched(tmp_path):
    env = lmdb.open(str(tmp_path / "kv"))
    with env.begin(write=True) as txn:
        for i in range(50):
            txn.put(b"user:%d" % i, b"precious data %d" % i)
    env.close()
    store = make_store(tmp_path, gpu=3, host=3, disk_blocks=64)
    run_request(store, 1, prompt(1))
    store.close()
    aside = [e for e in os.listdir(tmp_path) if e.startswith("kv.bad-")]
    assert len(aside) == 1
    env = lmdb.open(str(tmp_path / aside[0]), readonly=True)
    with env.begin() as txn:
        assert txn.get(b"user:7") == b"precious data 7" and txn.stat()["entries"] == 50
    env.close()


async def test_only_an_unclean_close_is_walked_in_a_child_process(tmp_path, monkeypatch):
    probes = []
    real = lmdb_env._probe
    monkeypatch.setattr(lmdb_env, "_probe", lambda path: probes.append(path) or real(path))
    await fill_disk(tmp_path)
    make_store(tmp_path, gpu=3, host=3, disk_blocks=64).close()
    assert probes == []                             # closed cleanly: the mark matches the file
    (tmp_path / "kv" / CLEAN_FILE).unlink()         # as after a kill -9
    make_store(tmp_path, gpu=3, host=3, disk_blocks=64).close()
    assert len(probes) == 1
    data = tmp_path / "kv" / "data.mdb"
    os.utime(data, ns=(0, 12345))                   # the file changed since the clean close
    store = make_store(tmp_path, gpu=3, host=3, disk_blocks=64)
    assert len(probes) == 2 and store.index.num_nodes > 0      # a healthy tier is kept
    store.close()


async def test_an_lmdb_error_in_the_startup_scan_replaces_the_tier(tmp_path, monkeypatch):
    await fill_disk(tmp_path)

    def failing_walk(self):
        raise lmdb.CorruptedError("injected: MDB_CORRUPTED")
    monkeypatch.setattr(DiskTier, "_walk", failing_walk)
    store = make_store(tmp_path, gpu=3, host=3, disk_blocks=64)
    assert store.index.num_nodes == 0
    assert [e for e in os.listdir(tmp_path) if e.startswith("kv.bad-")]
    monkeypatch.undo()
    run_request(store, 5, prompt(5))
    store.check_integrity()
    store.close()


HEADER_EDITS = {"v": 3, "fp": "another-model", "parent": b"\x00" * 16, "tokens": b"\x01\x00\x00\x00" * 4,
                "depth": 7, "prio": 99, "t": 1.5, "dtype": "torch.float16", "shape": [1, 2, 3], "sum": 12345}


@pytest.mark.parametrize("field", sorted(HEADER_EDITS))
async def test_every_header_field_is_covered_by_the_checksum(tmp_path, field):
    await fill_disk(tmp_path)
    edited = []

    def edit(key, value):
        if edited:
            return value
        n, checksum = _PREFIX.unpack_from(value, 0)
        header = msgpack.unpackb(value[_PREFIX.size:_PREFIX.size + n])
        assert field in header, f"the record format lost field {field!r}: update HEADER_EDITS"
        header[field] = HEADER_EDITS[field]
        packed = msgpack.packb(header)
        edited.append(key)
        return _PREFIX.pack(len(packed), checksum) + packed + value[_PREFIX.size + n:]
    edit_records(tmp_path, edit)
    store = make_store(tmp_path, gpu=3, host=3, disk_blocks=64)
    assert edited and store.stats().disk.corrupt_dropped == 1
    assert all(n.key != edited[0] for n in store.index.nodes())
    store.close()


def test_the_header_edits_cover_every_field_of_the_format():
    value = RecordFormat(FINGERPRINT, LAYOUT).encode(b"\x00" * 16, b"\x00" * 16, 0, 0,
                                                     torch.zeros(LAYOUT.block_shape))
    n, _ = _PREFIX.unpack_from(value, 0)
    assert set(msgpack.unpackb(bytes(value[_PREFIX.size:_PREFIX.size + n]))) == set(HEADER_EDITS)


def test_write_failures_are_logged_once_pause_the_writes_and_recover(tmp_path, caplog):
    disk = DiskTier(str(tmp_path / "kv"), FINGERPRINT, LAYOUT, max_bytes=1 << 20, write_retry_s=3600)
    real, failures = disk._apply, []

    def apply(batch):
        if len(failures) < 5:
            failures.append(1)
            return [k for k, v in batch if v is not None], "injected: No space left on device"
        return real(batch)
    disk._apply = apply
    value = lambda i: disk.encode(b"\x00" * 16, b"%04d" % i * 4, 0, 0, torch.zeros(LAYOUT.block_shape))  # noqa
    with caplog.at_level(logging.INFO, logger="kvgate.store.disk"):
        assert disk.put(chain_key(b"\x00" * 16, b"%04d" % 0 * 4), value(0))
        disk.flush_sync()                                   # fails: writes pause
        assert not disk.put(chain_key(b"\x00" * 16, b"%04d" % 1 * 4), value(1))
        assert disk.counters.write_errors == 1 and disk.counters.writes_paused == 1
        disk.write_retry_s = 0.0
        disk._writes_paused_until = 0.0                     # the pause is over
        for i in range(2, 12):                              # 4 more failures, then success
            key = chain_key(b"\x00" * 16, b"%04d" % i * 4)
            while not disk.put(key, value(i)):
                pass
            disk.flush_sync()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    recovered = [r for r in caplog.records if "succeed again" in r.getMessage()]
    assert len(errors) == 1 and "No space left" in errors[0].getMessage() and len(recovered) == 1
    assert disk.counters.write_errors == 5 and disk.counters.writes == 6
    disk.check_integrity()
    disk.close()


def test_a_failed_write_racing_a_requeue_keeps_the_accounting(tmp_path):
    lost = []
    disk = DiskTier(str(tmp_path / "kv"), FINGERPRINT, LAYOUT, max_bytes=1 << 20)
    key, other = chain_key(b"\x00" * 16, b"a" * 16), chain_key(b"\x00" * 16, b"b" * 16)

    def record(tokens, priority, fill):
        return BlockRecord(b"\x00" * 16, tokens, 0, priority, torch.full(LAYOUT.block_shape, fill),
                           done=lambda ok: ok or lost.append(tokens))
    v2 = record(b"a" * 16, 5, 1.0)
    disk.put(key, record(b"a" * 16, 0, 0.0))
    disk.put(other, record(b"b" * 16, 0, 0.0))
    batch = disk._take_batch()                 # on its way to LMDB ...
    disk.put(key, v2)                          # ... when the block is queued again
    disk._after_batch(batch, [key, other], "injected failure")
    assert lost == [b"a" * 16, b"b" * 16]      # both writes failed ...
    assert disk.sizes == {key: disk.value_bytes} and disk.used_bytes == disk.value_bytes
    assert disk._pending[key] is v2            # ... but the re-queued record is still accounted
    disk.check_integrity()
    disk.flush_sync()
    with disk._env.begin() as txn:
        assert txn.get(other) is None
        h, start = disk.format.header(key, txn.get(key))          # the second record, whole
        assert h["prio"] == 5 and bytes(txn.get(key))[start:] == v2.payload.numpy().tobytes()
    disk.close()


def test_a_fresh_tier_carries_the_mark_and_a_clean_close_mark(tmp_path):
    disk = DiskTier(str(tmp_path / "kv"), FINGERPRINT, LAYOUT, max_bytes=1 << 20)
    disk.close()
    env = lmdb.open(str(tmp_path / "kv"), readonly=True)
    with env.begin() as txn:
        assert txn.get(MARK_KEY) == lmdb_env.MARK_VALUE
    env.close()
    assert (tmp_path / "kv" / CLEAN_FILE).exists()
    assert lmdb_env.check_file(str(tmp_path / "kv")) is None


async def test_a_block_whose_record_cannot_be_encoded_is_skipped_and_the_rest_persists(tmp_path):
    """Defence behind the priority bounds: a record that cannot be encoded (a priority past 64
    bits reached the index) costs that record, not the eviction or the shutdown's persist."""
    store = make_store(tmp_path, gpu=6, host=3, disk_blocks=64)
    run_request(store, 1, prompt(1))
    run_request(store, 2, prompt(2))
    bad = store.match(store.root_key(), prompt(2)).nodes
    for n in bad:
        n.priority = 2**70                       # what admit now refuses
    for i in range(3, 6):                        # evictions push blocks through host to disk
        run_request(store, i, prompt(i))
    assert store.persist()[0] > 0
    await store.flush()
    store.check_integrity()
    store.close()
    again = make_store(tmp_path, gpu=6, host=3, disk_blocks=64)
    assert again.match(again.root_key(), prompt(1)).tiers == (Tier.DISK,) * 3
    assert again.match(again.root_key(), prompt(2)).tiers == ()
    again.close()


def test_the_map_grows_only_while_no_read_is_in_progress(tmp_path):
    """Growing LMDB's map remaps the file under every read transaction open in the process that
    grows it (the disk process: reads there would fail or crash): the resize waits for the reads
    in progress, and new reads wait for it. Driven here on the disk process's own object."""
    import threading

    from store.disk_process import Disk
    from store.pool import BlockPool
    path, fmt, root = str(tmp_path / "kv"), RecordFormat(FINGERPRINT, LAYOUT), b"\x00" * 16
    DiskTier(path, FINGERPRINT, LAYOUT, max_bytes=64 << 20).close()     # a checked, marked tier
    pool = BlockPool(Tier.HOST, LAYOUT, 1, "cpu", shared=True)
    disk = Disk(path, 1 << 20, 64 << 20, [(pool.fd, pool.bytes.nbytes)])
    key = chain_key(root, b"r" * 16)
    assert disk.write([[key, bytes(fmt.encode(root, b"r" * 16, 0, 0, torch.zeros(LAYOUT.block_shape)))]])["writes"] == 1
    in_copy, release, results, grew = threading.Event(), threading.Event(), [], []
    copy = disk._copy

    def held_copy(dst, payload):              # a reader, its read transaction open
        in_copy.set()
        release.wait(10)
        return copy(dst, payload)
    disk._copy = held_copy
    reading = threading.Thread(target=lambda: results.append(disk.read([[key, [0, 0, LAYOUT.block_bytes], None]])))
    reading.start()
    assert in_copy.wait(10)
    ops = [[chain_key(root, b"%04d" % i * 4), bytes(fmt.encode(root, b"%04d" % i * 4, 0, 0,
                                                                  torch.ones(LAYOUT.block_shape)))]
           for i in range(1500)]               # 1.5 MiB of records: more than the 1 MiB map holds
    writing = threading.Thread(target=lambda: grew.append(disk.write(ops)))
    writing.start()
    writing.join(0.3)
    assert writing.is_alive() and disk._remapping and not grew   # the resize waits for the read ...
    release.set()
    reading.join(10)
    writing.join(10)
    assert grew[0]["map_resizes"] > 0 and grew[0]["writes"] == 1500   # ... then grows the map
    head, length, checksum = results[0]["results"][0]
    assert fmt.check(key, head, length, checksum, root, b"r" * 16)
    assert pool.tensor.abs().sum() == 0           # the zeros written, copied into the shared pool
    disk.close()


def test_a_data_mdb_that_is_a_directory_is_moved_aside(tmp_path):
    (tmp_path / "kv" / "data.mdb").mkdir(parents=True)
    store = make_store(tmp_path, gpu=3, host=3, disk_blocks=64)
    assert [e for e in os.listdir(tmp_path) if e.startswith("kv.bad-")]
    assert os.path.isfile(tmp_path / "kv" / "data.mdb")
    run_request(store, 1, prompt(1))
    store.close()


async def test_a_tier_lmdb_finds_damaged_while_serving_is_moved_aside(tmp_path):
    """MDB_CORRUPTED on a read in the disk process (pages it cannot read, records it cannot
    delete): the tier is replaced by an empty one, which the disk process opens in its turn, not
    kept in service failing every read."""
    import asyncio

    from store.pool import BlockPool
    pool = BlockPool(Tier.HOST, LAYOUT, 1, "cpu", shared=True)
    disk = DiskTier(str(tmp_path / "kv"), FINGERPRINT, LAYOUT, max_bytes=64 << 20, shared_pools=(pool,))
    keys = [chain_key(b"\x00" * 16, b"%04d" % i * 4) for i in range(4)]
    for i, key in enumerate(keys):
        disk.put(key, disk.encode(b"\x00" * 16, b"%04d" % i * 4, 0, 0, torch.full(LAYOUT.block_shape, float(i))))
    await disk.flush()
    read = disk._process.read
    disk._process.read = lambda items: {"results": [None] * len(items), "damaged": True,
                                        "failure": "injected: MDB_CORRUPTED: Located page was wrong type"}
    assert await disk.load([(keys[0], b"\x00" * 16, b"0000" * 4)]) == [False]
    for _ in range(200):
        if disk.counters.replaced:
            break
        await asyncio.sleep(0.01)
    disk._process.read = read
    assert disk.counters.replaced == 1 and [e for e in os.listdir(tmp_path) if e.startswith("kv.bad-")]
    key = chain_key(b"\x00" * 16, b"next" * 4)         # the empty tier in its place serves
    disk.put(key, disk.encode(b"\x00" * 16, b"next" * 4, 0, 0, torch.full(LAYOUT.block_shape, 7.0)))
    await disk.flush()
    assert await disk.load([(key, b"\x00" * 16, b"next" * 4)], pool, [0]) == [True]
    assert torch.equal(pool.tensor[0], torch.full(LAYOUT.block_shape, 7.0, dtype=LAYOUT.dtype))
    assert await disk.load([(keys[1], b"\x00" * 16, b"0001" * 4)]) == [False]
    disk.close()
