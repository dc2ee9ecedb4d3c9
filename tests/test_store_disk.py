"""The disk tier: restart, corrupted / foreign / truncated records, map growth, size cap,
unusable directories, stale readers, a full disk. Every fault is a counted miss or a clear
error; nothing wrong is ever served."""
import os
import signal
import subprocess
import sys
import textwrap

import lmdb
import pytest
import torch

from store import BlockLayout, DiskTierError, Tier
from store.disk import DiskTier
from store.keys import chain_key, token_bytes
from store.lmdb_env import MARK_KEY
from tests.conftest import (
    BS,
    FINGERPRINT,
    LAYOUT,
    admit_from_disk,
    assert_loaded_kv,
    child_env,
    finish_request,
    make_store,
    run_request,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prompt(seed: int, n_blocks: int = 3) -> list[int]:
    return [seed * 1000 + i for i in range(n_blocks * BS)]


async def fill_disk(tmp_path, n_prompts: int = 4, **kw):
    """A store whose first prompts have been pushed down to disk; closed afterwards."""
    store = make_store(tmp_path, gpu=3, host=3, disk_blocks=64, **kw)
    for i in range(1, n_prompts + 1):
        run_request(store, i, prompt(i))
    await store.flush()
    store.close()


def edit_records(tmp_path, edit) -> int:
    """Apply `edit(key, value) -> new value | None (delete)` to every block record (not the
    tier's mark); returns count."""
    env = lmdb.open(str(tmp_path / "kv"))
    with env.begin(write=True) as txn:
        records = [(k, v) for k, v in txn.cursor() if k != MARK_KEY]
        for key, value in records:
            new = edit(key, value)
            if new is None:
                txn.delete(key)
            else:
                txn.put(key, new)
    env.close()
    return len(records)


async def test_restart_serves_blocks_written_by_the_previous_process(tmp_path):
    await fill_disk(tmp_path)
    store = make_store(tmp_path, gpu=3, host=3, disk_blocks=64)
    m = store.match(store.root_key(), prompt(1))
    assert m.tiers == (Tier.DISK,) * 3
    seq, filled = await admit_from_disk(store, "again", prompt(1))
    assert filled == 3
    assert_loaded_kv(store, seq, prompt(1), filled)  # exactly prompt 1's KV
    finish_request(store, seq, prompt(1))
    store.close()


async def test_corrupted_payload_is_a_counted_miss_and_deleted(tmp_path):
    await fill_disk(tmp_path)
    root = make_store(gpu=1).root_key()
    keys = [chain_key(root, token_bytes(prompt(1)[:BS]))]
    keys.append(chain_key(keys[0], token_bytes(prompt(1)[BS:2 * BS])))
    keys.append(chain_key(keys[1], token_bytes(prompt(1)[2 * BS:])))

    def flip_last_byte_of_block_1(key, value):
        return value[:-1] + bytes([value[-1] ^ 0xFF]) if key == keys[1] else value
    edit_records(tmp_path, flip_last_byte_of_block_1)
    store = make_store(tmp_path, gpu=3, host=3, disk_blocks=64)
    m = store.match(store.root_key(), prompt(1))
    assert m.tiers == (Tier.DISK,) * 3           # headers are fine: the scan keeps them
    seq, filled = await admit_from_disk(store, "x", prompt(1))   # the payload of block 1 is not
    assert store.stats().disk.corrupt_dropped == 1 and filled == 0
    # block 1 is gone, and block 2 with it (its prefix has a hole); block 0 stays on disk
    assert store.match(store.root_key(), prompt(1)).tiers == (Tier.DISK,)
    finish_request(store, seq, prompt(1))        # computed instead
    await store.flush()
    store.check_integrity()
    store.close()
    env = lmdb.open(str(tmp_path / "kv"))
    on_disk = set(bytes(k) for k, _ in env.begin().cursor())
    env.close()
    assert keys[0] in on_disk and keys[1] not in on_disk and keys[2] not in on_disk


@pytest.mark.parametrize("damage,why", [
    (lambda v: v[:len(v) // 2], "truncated"),
    (lambda v: b"\x05\x00\x00\x00garbage" + v[9:], "header"),
    (lambda v: b"", "empty"),
])
async def test_damaged_records_are_dropped_at_startup(tmp_path, damage, why):
    await fill_disk(tmp_path)
    n = edit_records(tmp_path, lambda k, v: damage(v))
    store = make_store(tmp_path, gpu=3, host=3, disk_blocks=64)
    assert store.stats().disk.corrupt_dropped == n, why
    assert store.index.num_nodes == 0 and store.disk.used_bytes == 0
    store.check_integrity()
    store.close()


async def test_records_of_another_model_or_layout_are_never_served(tmp_path):
    await fill_disk(tmp_path)
    other = make_store(tmp_path, gpu=3, host=3, disk_blocks=64, fingerprint="another-model")
    assert other.index.num_nodes == 0 and other.stats().disk.corrupt_dropped > 0
    other.close()
    await fill_disk(tmp_path)
    half = BlockLayout(LAYOUT.num_layers, BS, LAYOUT.num_kv_heads, LAYOUT.head_dim, torch.float16)
    store = make_store(tmp_path, gpu=3, host=3, disk_blocks=64, layout=half)
    assert store.index.num_nodes == 0 and store.stats().disk.corrupt_dropped > 0
    store.close()


async def test_orphans_are_deleted_at_startup(tmp_path):
    await fill_disk(tmp_path)
    first_block = chain_key(make_store(gpu=1).root_key(), token_bytes(prompt(1)[:BS]))
    edit_records(tmp_path, lambda k, v: None if k == first_block else v)
    store = make_store(tmp_path, gpu=3, host=3, disk_blocks=64)
    assert store.match(store.root_key(), prompt(1)).nodes == ()
    assert store.stats().disk.deletes == 2       # blocks 1 and 2 of prompt 1 lost their parent
    store.check_integrity()
    store.close()


def test_disk_cap_is_enforced_by_eviction(store_factory):
    store = store_factory(gpu=2, host=2, disk_blocks=5)
    for i in range(1, 9):
        run_request(store, i, prompt(i, n_blocks=2))
    s = store.stats()
    assert store.disk.used_bytes <= store.disk.max_bytes
    assert s.tiers[Tier.DISK].evictions > 0 and len(store.disk.sizes) <= 5


async def test_map_grows_instead_of_failing(tmp_path):
    disk = DiskTier(str(tmp_path / "grow"), FINGERPRINT, LAYOUT, max_bytes=1 << 30,
                    initial_map_bytes=64 * 1024)
    parent = b"\0" * 16
    for i in range(200):
        toks = token_bytes([i] * BS)
        value = disk.encode(parent, toks, 0, 0, torch.randn(LAYOUT.block_shape))
        assert disk.put(chain_key(parent, toks), value)
    await disk.flush()
    assert disk.counters.map_resizes > 0 and disk.counters.writes == 200
    assert disk.counters.write_errors == 0
    disk.close()
    reopened = DiskTier(str(tmp_path / "grow"), FINGERPRINT, LAYOUT, max_bytes=1 << 30)
    assert len(reopened.scan()) == 200
    reopened.close()


def test_unusable_directory_is_a_clear_error(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(DiskTierError, match="cannot open disk tier at .*a-file/kv"):
        DiskTier(str(tmp_path / "a-file" / "kv"), FINGERPRINT, LAYOUT, max_bytes=1 << 20)


def test_missing_directory_is_created(tmp_path):
    disk = DiskTier(str(tmp_path / "new" / "nested"), FINGERPRINT, LAYOUT, max_bytes=1 << 20)
    assert (tmp_path / "new" / "nested" / "data.mdb").exists()
    disk.close()


def _lmdb_child(path: str, with_reader: bool) -> subprocess.Popen:
    """A process holding the environment open (and a read transaction, if asked)."""
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import lmdb, sys
        env = lmdb.open({path!r})
        txn = env.begin() if {with_reader} else None
        txn and txn.get(b"any")     # holds a reader slot
        print("open", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "open"
    return child


def test_stale_readers_of_a_killed_process_are_cleared(tmp_path):
    # LMDB resets its reader table when the first process opens the environment, so a stale
    # slot matters when another process (here `keeper`) keeps the environment open.
    path = str(tmp_path / "kv")
    DiskTier(path, FINGERPRINT, LAYOUT, max_bytes=1 << 20).close()
    keeper = _lmdb_child(path, with_reader=False)
    reader = _lmdb_child(path, with_reader=True)
    reader.send_signal(signal.SIGKILL)
    reader.wait()
    try:
        disk = DiskTier(path, FINGERPRINT, LAYOUT, max_bytes=1 << 20)
        assert disk.stale_readers_cleared == 1
        disk.close()
    finally:
        keeper.kill()
        keeper.wait()


def test_full_disk_is_counted_and_the_store_keeps_serving(tmp_path):
    """A file-size limit on the writer process makes LMDB's writes fail as on a full disk (in a
    child process, so the limit does not touch pytest's own files). The failure is logged once,
    not per write."""
    script = textwrap.dedent(f"""
        import asyncio, resource, signal, pathlib
        from tests.conftest import child_env, make_store, run_request
        from tests.test_store_disk import prompt
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # a write past the limit gets EFBIG

        async def main():
            store = make_store(pathlib.Path({str(tmp_path)!r}), gpu=2, host=2, disk_blocks=400)
            resource.prlimit(store.disk._process._proc.pid, resource.RLIMIT_FSIZE, (48 * 1024, 48 * 1024))
            for i in range(1, 40):
                run_request(store, i, prompt(i, n_blocks=2))
                await store.flush()
                store.check_integrity()
            s = store.stats()
            print("write_errors", s.disk.write_errors, "writes", s.disk.writes, "paused", s.disk.writes_paused)
            run_request(store, "after", prompt(1, n_blocks=2))
            store.close()
            print("ok")
        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                         env=child_env(), timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    words = out.stdout.split()
    assert words[-1] == "ok"
    assert int(words[words.index("write_errors") + 1]) > 0, out.stdout
    assert int(words[words.index("writes") + 1]) > 0, out.stdout
    # the failure is logged once, and writes pause instead of failing again and again
    assert int(words[words.index("paused") + 1]) > 0, out.stdout
    assert out.stderr.count("writes failing") == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]


async def test_write_queue_over_budget_drops_blocks_cleanly(tmp_path):
    store = make_store(tmp_path, gpu=2, host=4, disk_blocks=64, write_policy="all")
    store.disk.max_pending_bytes = 2 * store.disk.value_bytes
    for i in range(1, 4):
        run_request(store, i, prompt(i, n_blocks=2), flush=False)   # the queue fills up
    assert store.stats().disk.pending_full == 2                     # 4 demoted to host, 2 queued
    store.check_integrity()
    await store.flush()
    store.close()


async def test_persist_waits_for_the_write_queue_instead_of_dropping(tmp_path):
    """At shutdown every cached block is written, even when they are many times the queue."""
    store = make_store(tmp_path, gpu=16, host=2, disk_blocks=64)
    store.disk.max_pending_bytes = 2 * store.disk.value_bytes
    for i in range(1, 4):
        run_request(store, i, prompt(i, n_blocks=4))   # 12 blocks cached on the GPU
    assert store.persist() == (12, 0)
    assert store.stats().disk.pending_full == 0
    store.close()
    store = make_store(tmp_path, gpu=16, host=2, disk_blocks=64)
    for i in range(1, 4):
        assert store.match(store.root_key(), prompt(i, n_blocks=4)).tiers == (Tier.DISK,) * 4
    store.close()


async def test_disk_read_rate_is_measured_at_startup_from_existing_records(tmp_path):
    assert await make_store(tmp_path, gpu=3, host=3).measure_disk_read() is None   # no disk tier
    await fill_disk(tmp_path)
    store = make_store(tmp_path, gpu=3, host=3, disk_blocks=64)
    rate = await store.measure_disk_read()
    assert rate is not None and rate > 0 and store.disk_read_rate == rate
    assert store.stats().disk.reads > 0 and store.stats().tiers[Tier.HOST].locked == 0
    store.check_integrity()
    store.close()


async def test_blocks_are_encoded_by_the_disk_process_from_shared_memory(tmp_path, monkeypatch):
    """The write path's rule: a block waiting in the host tier or the disk staging area is
    encoded (checksum, copy) and written by the disk process, where it lies; this process
    encodes nothing (a thread here would wait for the interpreter lock at every step)."""
    from store import record

    def here(*args, **kw):
        raise AssertionError("a block was encoded in the engine's process")
    monkeypatch.setattr(record, "pack_value", here)
    store = make_store(tmp_path, gpu=3, host=3, disk_blocks=64)
    assert store.host.fd is not None and store.disk.staging.fd is not None
    for i in range(1, 5):
        run_request(store, i, prompt(i))          # blocks leave the GPU through the host tier
    assert store.stats().disk.writes >= 3 and store.stats().disk.write_errors == 0
    store.close()
    monkeypatch.undo()
    again = make_store(tmp_path, gpu=3, host=3, disk_blocks=64)
    assert again.match(again.root_key(), prompt(1)).tiers == (Tier.DISK,) * 3
    run_request(again, "again", prompt(1))        # served from disk, checked against the KV written
    again.close()


async def test_reads_while_serving_are_the_disk_process_s(tmp_path):
    """The read path's rule: once the tier is scanned, this process opens no LMDB transaction;
    the disk process copies each payload into its slot and this process checks its head."""
    await fill_disk(tmp_path)
    store = make_store(tmp_path, gpu=3, host=3, disk_blocks=64)

    class NoTransactions:
        def __getattr__(self, name):
            raise AssertionError(f"LMDB used in the engine's process while serving: {name}")
    env, store.disk._env = store.disk._env, NoTransactions()
    seq, filled = await admit_from_disk(store, "again", prompt(1))
    assert filled == 3 and store.stats().disk.reads == 3
    assert_loaded_kv(store, seq, prompt(1), filled)  # exactly prompt 1's KV
    finish_request(store, seq, prompt(1))
    store.disk._env = env
    store.close()


async def test_a_disk_process_that_dies_costs_its_batch_and_is_started_again(tmp_path):
    disk = DiskTier(str(tmp_path / "kv"), FINGERPRINT, LAYOUT, max_bytes=1 << 20, write_retry_s=0.0)
    parent = b"\x00" * 16

    def put(i):
        tokens = b"%04d" % i * 4
        return disk.put(chain_key(parent, tokens), disk.encode(parent, tokens, 0, 0, torch.ones(LAYOUT.block_shape)))
    assert put(0)
    await disk.flush()
    disk._process._proc.kill()                    # killed (out of memory, an operator)
    assert put(1)
    await disk.flush()
    assert disk.counters.write_errors == 1 and chain_key(parent, b"0001" * 4) not in disk.sizes
    assert put(2)                                 # the next write starts a new process
    await disk.flush()
    assert disk.counters.writes == 2 and disk.counters.write_errors == 1
    keys = [(chain_key(parent, b"%04d" % i * 4), parent, b"%04d" % i * 4) for i in (0, 2)]
    assert await disk.load(keys) == [True, True]
    disk.check_integrity()
    disk.close()
