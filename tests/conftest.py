"""Shared helpers: a tiny block layout, stores on a temporary directory, and deterministic
KV contents derived from each block's key, so a test can tell exactly which block it got."""
from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest
import torch
import transformers

from store import BlockLayout, BlockStore, SeqBlocks, StoreConfig

# The tests (and the servers they start) never touch the user's cache directory, where the
# default disk tier and the weight-fingerprint cache live.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="kvgate-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], True)

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

BS = 4  # tokens per block in the store tests
LAYOUT = BlockLayout(num_layers=2, block_size=BS, num_kv_heads=2, head_dim=8, dtype=torch.float32)
FINGERPRINT = "test-model-fp"


def block_content(key: bytes, layout: BlockLayout = LAYOUT) -> torch.Tensor:
    """The KV a block with this key holds in these tests: random, but a function of the key."""
    g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)
    return torch.randn(layout.block_shape, generator=g).to(layout.dtype)


def prefix_keys(store: BlockStore, seq: SeqBlocks, tokens: list[int]) -> list[bytes]:
    return seq.keys.all(tokens)


def write_kv(store: BlockStore, seq: SeqBlocks, tokens: list[int]) -> None:
    """Stand-in for a forward pass: fill the blocks that were not cached."""
    keys = prefix_keys(store, seq, tokens)
    first = seq.num_cached_tokens // store.block_size
    for i in range(first, len(seq.slots)):
        key = keys[i] if i < len(keys) else b"partial-block-%d" % i
        store.gpu.tensor[seq.slots[i]] = block_content(key, store.layout).to(store.device)


def assert_cached_kv(store: BlockStore, seq: SeqBlocks, tokens: list[int]) -> None:
    """Every cached block of `seq` holds exactly the KV computed for its prefix."""
    keys = prefix_keys(store, seq, tokens)
    for i in range(seq.num_cached_tokens // store.block_size):
        got = store.gpu.tensor[seq.slots[i]].cpu()
        assert torch.equal(got, block_content(keys[i], store.layout)), f"block {i} holds wrong KV"


async def admit_from_disk(store: BlockStore, seq_id, tokens: list[int], namespace: str = "") -> tuple[SeqBlocks, int]:
    """The engine's way with a prompt whose cached prefix is partly on disk: read the disk part
    (`start_load`, awaited here), admit the rest of the prefix, copy what was read into the
    sequence's GPU slots (`advance_load`). Returns the sequence and how many blocks after its
    admitted prefix were filled from disk (`assert_loaded_kv` checks them)."""
    scope = store.scope(namespace, tokens)
    if store.start_load(seq_id, store.match(scope, tokens)):
        await next(sl.task for sl in store.loader.sequence_loads() if sl.seq_id == seq_id)
    seq = store.admit(seq_id, scope, tokens)
    step = store.advance_load(seq_id, seq.num_cached_tokens)
    store.drop_load(seq_id)
    return seq, step.filled if step is not None else 0


def assert_loaded_kv(store: BlockStore, seq: SeqBlocks, tokens: list[int], filled: int) -> None:
    """The `filled` blocks after `seq`'s admitted prefix hold exactly their prefix's KV."""
    keys = prefix_keys(store, seq, tokens)
    first = seq.num_cached_tokens // store.block_size
    for i in range(first, first + filled):
        got = store.gpu.tensor[seq.slots[i]].cpu()
        assert torch.equal(got, block_content(keys[i], store.layout)), f"block {i} read wrong"


def finish_request(store: BlockStore, seq: SeqBlocks, tokens: list[int]) -> None:
    """'Compute' what was not cached, commit, release (after `admit_from_disk`)."""
    write_kv(store, seq, tokens)
    store.commit(seq.seq_id, tokens)
    store.release(seq.seq_id)
    store.check_integrity()


def make_store(tmp_path=None, gpu: int = 8, host: int = 0, disk_blocks: int = 0,
               layout: BlockLayout = LAYOUT, write_policy: str = "all", **kw) -> BlockStore:
    """A store; its disk tier (if any) writes every block leaving the host tier, unless a test
    picks another `write_policy` (the policies have tests of their own)."""
    disk = {}
    if disk_blocks:
        value = layout.block_bytes + 256 + 4 * layout.block_size
        disk = dict(disk_path=str(tmp_path / "kv"), disk_max_bytes=disk_blocks * value)
    cfg = StoreConfig(block_size=layout.block_size, gpu_blocks=gpu, host_blocks=host,
                      write_policy=write_policy, **disk)
    return BlockStore(cfg, layout, kw.pop("fingerprint", FINGERPRINT), **kw)


def run_request(store: BlockStore, seq_id, tokens: list[int], priority: int = 0,
                flush: bool = True, namespace: str = "", retention=None) -> SeqBlocks:
    """Admit, check cached KV, 'compute' the rest, commit, release; integrity after each."""
    seq = store.admit(seq_id, store.scope(namespace, tokens), tokens, priority, retention=retention)
    assert_cached_kv(store, seq, tokens)
    write_kv(store, seq, tokens)
    store.commit(seq_id, tokens)
    store.check_integrity()
    store.release(seq_id)
    if flush and store.disk is not None:   # time passes between requests: its writes land
        store.disk.flush_sync()
    store.check_integrity()
    return seq


@pytest.fixture
def store_factory(tmp_path) -> Iterator:
    made: list[BlockStore] = []

    def factory(**kw) -> BlockStore:
        s = make_store(tmp_path, **kw)
        made.append(s)
        return s
    yield factory
    for s in made:
        s.close()


def child_env() -> dict[str, str]:
    """The environment for a child Python that imports this repository (and what we import)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> str:
    """Where the tiny test models are saved (built once per test session)."""
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture
def llama(model_root) -> str:
    """The tiny Llama checkpoint the engine tests compare with `transformers.generate`."""
    from tests.models import build_model_dir
    return build_model_dir(model_root, "llama")


@pytest.fixture(scope="session")
def demo():
    """The built-in demo model, loaded once for the tests that drive an engine in-process."""
    from engine.config import ModelConfig
    from engine.model import load_model
    return load_model(ModelConfig(path="builtin:tiny", device="cpu"), block_size=16)


class EngineProcesses:
    """Engine processes shared by the HTTP tests, per model section: started on first use and
    reopened (`EngineProcess.reopen`: a new engine and store in the same process, the model kept
    in memory) for each test's configuration. One app holds a process at a time (from `get` to
    `release`, which runs after the app's cleanup); a test with two apps at once gets two."""

    def __init__(self) -> None:
        self._started: list = []
        self._held: set = set()         # processes an app (or a test) holds now

    async def get(self, config, entry=None):
        from engine.serving import process as engine_process
        from gateway.engines.pipe import EngineProcess
        entry = entry or engine_process.main
        key = (config.model, config.engine.block_size, entry)
        for process in self._started:
            if (process.config.model, process.config.engine.block_size, process.entry) == key and process.alive \
                    and process not in self._held:
                await process.reopen(config)
                break
        else:
            process = EngineProcess(config, log_level="warning", entry=entry)
            await process.start()
            self._started.append(process)
        self._held.add(process)
        return process

    def release(self, process) -> None:
        self._held.discard(process)

    def stop_all(self) -> None:
        for process in self._started:
            asyncio.run(process.stop(persist=False))


@pytest.fixture(scope="session")
def engine_processes():
    processes = EngineProcesses()
    yield processes
    processes.stop_all()


@pytest.fixture
def make_client(aiohttp_client, engine_processes):
    """An HTTP client of a kvgate app over the demo model, served as `kvgate serve` serves it,
    its engine in a (shared) engine process: `await make_client(**sections)`, sections of the
    configuration on top of a 256-block GPU pool, no host or disk tier (a test turns them on
    with explicit sizes) and integrity checks; `entry=` another main for the engine process
    (tests/faults.py)."""
    from aiohttp.test_utils import TestServer

    from gateway.app import init_app
    from gateway.config import build_config
    from gateway.server import make_runner

    class KvgateTestServer(TestServer):      # served as `kvgate serve` serves (gateway/server.py)
        async def _make_runner(self, **kwargs):
            return make_runner(self.app, **kwargs)

    async def make(entry=None, **sections):
        store = {"gpu": {"num_blocks": 256}, "host": {"enabled": False}, "disk": {"enabled": False}}
        store.update(sections.pop("store", {}))
        engine = {"check_integrity": True, **sections.pop("engine", {})}
        model = {"path": "builtin:tiny", "device": "cpu", **sections.pop("model", {})}
        config = build_config({"store": store, "engine": engine, "model": model, **sections})
        process = await engine_processes.get(config, entry)
        app = init_app(config, engine_process=process)
        app.on_cleanup.append(lambda app: _release(engine_processes, process))   # after the app's own
        return await aiohttp_client(KvgateTestServer(app))
    return make


async def _release(processes: EngineProcesses, process) -> None:
    processes.release(process)


async def engine_stats(client) -> dict:
    """The engine process's snapshot (gateway/metrics.py), with no broken invariant in it."""
    from gateway.keys import ENGINE
    stats = await client.app[ENGINE].stats()
    assert stats["integrity_error"] is None, stats["integrity_error"]
    return stats


async def wait_idle(client) -> dict:
    """Wait until the app's engine has no request running or waiting; its snapshot then."""
    from gateway.keys import ENGINE
    return await engine_idle(client.app[ENGINE])


async def engine_idle(engine) -> dict:
    """Wait until an EngineClient's engine has no request running or waiting (aborts reach it
    over the pipe within a step), with no broken invariant; its snapshot then."""
    for _ in range(500):
        stats = await engine.stats()
        assert stats["integrity_error"] is None, stats["integrity_error"]
        if stats["requests"] == {"running": 0, "waiting": 0}:
            return stats
        await asyncio.sleep(0.01)
    raise AssertionError(f"the engine is not idle: {stats['requests']}")
