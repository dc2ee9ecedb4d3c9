"""What a server gets without configuring anything: every tier on, sized from the machine; and
what an operator's sizes are checked against. The machine's memory and free space are set by
the tests (engine.serving.tiers reads them through two functions)."""
import os

import pytest

from engine.serving import tiers
from gateway.config import ConfigError, build_config
from engine.serving.tiers import open_engine, plan_tiers
from store import BlockStore
from store.disk import DiskTier
from tests.http_util import parse_metric

GIB = 1 << 30


@pytest.fixture
def machine(monkeypatch):
    """A machine with 100 GiB of memory available and 1 TiB free on every disk."""
    state = {"memory": 100 * GIB, "free": 1024 * GIB}
    monkeypatch.setattr(tiers, "available_memory", lambda: state["memory"])
    monkeypatch.setattr(tiers, "free_disk_bytes", lambda path: state["free"])
    return state


def plan(demo, **store):
    return plan_tiers(build_config({"store": store}), demo)


def test_the_default_server_has_every_tier_sized_from_the_machine(demo, machine):
    config, reports = plan(demo)
    gpu, host, disk = reports
    block = demo.block_layout(16).block_bytes
    record = block + 256 + 4 * 16
    assert gpu.enabled and gpu.blocks == tiers.CPU_DEFAULT_GPU_BLOCKS and gpu.sized == "auto"
    assert host.enabled and host.sized == "auto"
    assert host.blocks == int(100 * GIB * 0.2) // block == config.host_blocks          # a fifth of RAM
    cache = os.path.join(os.environ["XDG_CACHE_HOME"], "kvgate", "kv", demo.fingerprint[:16])
    assert disk.enabled and disk.path == cache == config.disk_path and os.path.isdir(cache)
    assert disk.bytes == tiers.DISK_AUTO_MAX_BYTES == config.disk_max_bytes   # a quarter of 1 TiB, capped
    assert disk.blocks == disk.bytes // record
    assert config.write_policy == "auto"
    machine["memory"], machine["free"] = 8 * GIB, 40 * GIB                    # a smaller machine
    config, (_, host, disk) = plan(demo)
    assert host.blocks == int(8 * GIB * 0.2) // block and disk.bytes == 10 * GIB


def test_tiers_turned_off_say_so_and_a_disk_tier_alone_stages_through_its_own_memory(demo, machine, tmp_path):
    config, (_, host, disk) = plan(demo, host={"enabled": False}, disk={"path": str(tmp_path / "kv")})
    assert not host.enabled and config.host_blocks == 0
    assert disk.enabled and disk.sized == "auto" and disk.path == str(tmp_path / "kv")   # path alone is enough
    assert disk.describe().endswith("; 1024 blocks of staging")     # 512 MiB of the demo's small blocks
    store = BlockStore(config, demo.block_layout(16), demo.fingerprint)
    assert store.host.num_blocks == 0 and store.disk.staging.num_blocks == 1024     # no host slot at all
    store.close()
    block = demo.block_layout(16).block_bytes
    config, (_, _, disk) = plan(demo, disk={"path": str(tmp_path / "kv2"), "staging_bytes": 40 * block})
    assert config.disk_staging_bytes == 40 * block and disk.describe().endswith("; 40 blocks of staging")
    _, (_, host, disk) = plan(demo, host={"enabled": False}, disk={"enabled": False})
    assert host.describe() == "host=off (store.host.enabled = false)"
    assert disk.describe() == "disk=off (store.disk.enabled = false)"


@pytest.mark.parametrize("store,key,why", [
    ({"host": {"num_blocks": 10**9}}, "store.host.num_blocks", "exceed the 100.0 GiB of memory available"),
    ({"disk": {"path": "KV", "max_bytes": 2 * 1024 * GIB}}, "store.disk.max_bytes", "bytes exceed the"),
    ({"disk": {"path": "MISSING/kv"}}, "store.disk.path", "does not exist"),
    ({"disk": {"path": "FILE/kv"}}, "store.disk.path", "is not a directory"),
])
def test_configured_sizes_the_machine_cannot_give_name_the_key(demo, machine, tmp_path, store, key, why):
    (tmp_path / "FILE").write_text("")
    for tier in store.values():
        if "path" in tier:
            tier["path"] = str(tmp_path / tier["path"])
    with pytest.raises(ConfigError) as e:
        plan(demo, **store)
    assert str(e.value).startswith(key + ": ") and why in str(e.value)


def test_automatic_tiers_shrink_or_turn_off_with_a_warning(demo, machine, monkeypatch, tmp_path, caplog):
    machine["free"] = 1 << 20                                   # 1 MiB free: not worth a tier
    _, (_, _, disk) = plan(demo)
    assert not disk.enabled and "too little free space" in disk.note
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))   # the cache directory cannot be made
    machine["free"] = 1024 * GIB
    _, (_, _, disk) = plan(demo)
    assert not disk.enabled and "cannot create" in disk.note
    assert "disk tier off" in caplog.text


def test_a_tier_another_process_holds_is_refused_or_turned_off(demo, machine, tmp_path):
    from engine.engine import Engine
    config = build_config({"store": {"disk": {"path": str(tmp_path / "kv")}}})
    holder = DiskTier(str(tmp_path / "kv"), demo.fingerprint, demo.block_layout(16), 1 << 30)
    try:
        with pytest.raises(ConfigError, match="store.disk.path: .*in use by another process"):
            open_engine(config, demo, lambda store: Engine(demo, config.engine, store))
        auto = build_config({})
        path = plan(demo)[0].disk_path
        other = DiskTier(path, demo.fingerprint, demo.block_layout(16), 1 << 30)
        try:
            engine, reports = open_engine(auto, demo, lambda store: Engine(demo, auto.engine, store))
            assert engine.store.disk is None and not reports[2].enabled and "in use" in reports[2].note
            engine.store.close()
        finally:
            other.close()
    finally:
        holder.close()


async def test_health_and_metrics_say_what_each_tier_got(make_client, tmp_path):
    # the engine process sizes the tiers, from this machine's real memory and free space
    client = await make_client(store={"host": {"num_blocks": 64}, "disk": {"path": str(tmp_path / "kv")}})
    health = await (await client.get("/health")).json()
    assert health["tiers"]["host"]["blocks"] == 64 and health["tiers"]["host"]["sized"] == "configured"
    assert health["tiers"]["disk"]["enabled"] and health["tiers"]["disk"]["sized"] == "auto"
    assert "path" not in health["tiers"]["disk"]                  # no file system layout to anyone
    metrics = await (await client.get("/metrics")).text()
    assert parse_metric(metrics, "kvgate_tier_enabled", tier="disk") == 1
    assert parse_metric(metrics, "kvgate_tier_enabled", tier="host") == 1
    assert parse_metric(metrics, "kvgate_disk_writes_skipped_total", reason="policy") == 0
    assert parse_metric(metrics, "kvgate_disk_spilled_blocks_total") == 0
    assert parse_metric(metrics, "kvgate_disk_writes_skipped_total", reason="disk_busy") == 0
    off = await make_client()
    metrics = await (await off.get("/metrics")).text()
    assert parse_metric(metrics, "kvgate_tier_enabled", tier="disk") == 0
    assert parse_metric(metrics, "kvgate_tier_capacity_bytes", tier="host") == 0
    assert parse_metric(metrics, "kvgate_blocks", -1, state="free", tier="host") == -1   # off: no counts, not zeros
    assert parse_metric(metrics, "kvgate_blocks", -1, state="free", tier="gpu") > 0
