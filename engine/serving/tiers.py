"""Sizing the KV tiers from the machine, and what each tier got.

Out of the box every tier is on: the GPU pool takes `memory_fraction` of the GPU memory left
after the model, the host tier `memory_fraction` of the memory available at start-up (at most
HOST_AUTO_MAX_BYTES), the disk tier lives in the user cache directory, one LMDB directory per
model fingerprint, capped at `free_space_fraction` of the free space (at most DISK_AUTO_MAX_BYTES).
A size the operator sets is checked against the machine and refused with one line naming the
key; a size kvgate chose is shrunk or the tier turned off, with a warning.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass, replace

import torch

from engine.config import user_cache_dir
from engine.model import LoadedModel
from engine.serving.config import ConfigError, ServingConfig
from store import BlockLayout, DiskTierError, StoreConfig
from store.config import disk_staging_blocks
from store.record import RecordFormat

log = logging.getLogger("kvgate.gateway")

CPU_DEFAULT_GPU_BLOCKS = 2048
HOST_AUTO_MAX_BYTES = 64 << 30
DISK_AUTO_MAX_BYTES = 64 << 30
DISK_MIN_BLOCKS = 64              # an automatic disk tier smaller than this is not worth it


@dataclass(frozen=True)
class TierReport:
    """What one tier got at start-up: for the log, /health and /metrics."""
    tier: str                      # "gpu", "host", "disk"
    enabled: bool
    blocks: int = 0                # capacity in blocks (the disk tier: records that fit)
    bytes: int = 0
    sized: str = ""                # "configured" or "auto"
    path: str = ""                 # the disk tier's directory
    note: str = ""                 # why it is off, or what was adjusted

    def describe(self) -> str:
        if not self.enabled:
            return f"{self.tier}=off ({self.note})"
        where = f" at {self.path}" if self.path else ""
        note = f"; {self.note}" if self.note else ""
        return f"{self.tier}={self.blocks} blocks ({self.bytes / 2**30:.1f} GiB, {self.sized}){where}{note}"

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "tier" and v != ""}


CONVERSATION_TOKENS = 2048      # the unit "conversations" are counted in (start-up log, /v1/cache)


def kv_arithmetic(reports: list[TierReport], block_size: int, block_bytes: int) -> dict:
    """What the tiers hold in a user's units: bytes of KV per token (all layers, K and V), and
    per tier the tokens it holds and how many conversations of CONVERSATION_TOKENS that is."""
    tiers = {r.tier: {"enabled": r.enabled, "blocks": r.blocks, "tokens": r.blocks * block_size, "bytes": r.bytes,
                      "conversations": r.blocks * block_size // CONVERSATION_TOKENS} for r in reports}
    return {"block_size": block_size, "bytes_per_token": block_bytes // block_size,
            "conversation_tokens": CONVERSATION_TOKENS, "tiers": tiers}


def describe_kv(kv: dict) -> str:
    """The start-up log's line: `kv_arithmetic` in words."""
    held = ", ".join(f"{name} {t['tokens']:,} tokens (~{t['conversations']:,} conversations)"
                     for name, t in kv["tiers"].items() if t["enabled"])
    return (f"{kv['bytes_per_token']:,} bytes of KV per token; {held}, counting a conversation as "
            f"{kv['conversation_tokens']:,} tokens")


def plan_tiers(config: ServingConfig, model: LoadedModel) -> tuple[StoreConfig, list[TierReport]]:
    """The store's configuration for this machine, and a report per tier (the disk tier's says
    how many blocks its own staging area holds). Raises ConfigError naming the key when a
    configured size cannot be had."""
    layout = model.block_layout(config.engine.block_size)
    gpu = _gpu(config, model, layout.block_bytes)
    host = _host(config, layout.block_bytes)
    disk = _disk(config, model)
    store = StoreConfig(block_size=config.engine.block_size, gpu_blocks=gpu.blocks, host_blocks=host.blocks,
                        disk_path=disk.path if disk.enabled else "", disk_max_bytes=disk.bytes,
                        write_policy=config.store.disk.write_policy,
                        disk_staging_bytes=config.store.disk.staging_bytes)
    return store, _noting_staging(store, [gpu, host, disk], layout)


def _noting_staging(store: StoreConfig, reports: list[TierReport], layout: BlockLayout) -> list[TierReport]:
    """The reports, the disk tier's saying how many blocks its own staging area holds."""
    gpu, host, disk = reports
    if store.disk_path:
        staging = disk_staging_blocks(store, layout)
        disk = replace(disk, note="; ".join(filter(None, (disk.note, f"{staging} blocks of staging"))))
    return [gpu, host, disk]


def _gpu(config: ServingConfig, model: LoadedModel, block_bytes: int) -> TierReport:
    tier = config.store.gpu
    if tier.num_blocks:
        return TierReport("gpu", True, tier.num_blocks, tier.num_blocks * block_bytes, "configured")
    if model.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.device)
        blocks = int(free * tier.memory_fraction) // block_bytes
    else:
        blocks = CPU_DEFAULT_GPU_BLOCKS
    return TierReport("gpu", True, blocks, blocks * block_bytes, "auto")


def _host(config: ServingConfig, block_bytes: int) -> TierReport:
    tier = config.store.host
    if not tier.enabled:
        return TierReport("host", False, note="store.host.enabled = false")
    available = available_memory()
    if tier.num_blocks:
        nbytes = tier.num_blocks * block_bytes
        if nbytes > available:
            raise ConfigError(f"store.host.num_blocks: {tier.num_blocks} blocks of {block_bytes} bytes "
                              f"({nbytes / 2**30:.1f} GiB) exceed the {available / 2**30:.1f} GiB of memory "
                              f"available")
        return TierReport("host", True, tier.num_blocks, nbytes, "configured")
    blocks = int(min(available * tier.memory_fraction, HOST_AUTO_MAX_BYTES)) // block_bytes
    if blocks < 1:
        log.warning("host tier off: %.1f GiB of memory available", available / 2**30)
        return TierReport("host", False, note="too little memory available")
    return TierReport("host", True, blocks, blocks * block_bytes, "auto")


def _disk(config: ServingConfig, model: LoadedModel) -> TierReport:
    tier = config.store.disk
    if not tier.enabled:
        return TierReport("disk", False, note="store.disk.enabled = false")
    record_bytes = RecordFormat(model.fingerprint, model.block_layout(config.engine.block_size)).max_bytes
    if tier.path:
        path = os.path.abspath(os.path.expanduser(tier.path))
        parent = path if os.path.isdir(path) else os.path.dirname(path)
        if os.path.exists(path) and not os.path.isdir(path) or os.path.exists(parent) and not os.path.isdir(parent):
            raise ConfigError(f"store.disk.path: {path!r} is not a directory")
        if not os.path.isdir(parent):
            raise ConfigError(f"store.disk.path: {parent!r} does not exist (create it, or point the "
                              f"tier at an existing directory)")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"store.disk.path: {parent!r} is not writable by this user")
    else:
        path = os.path.join(user_cache_dir(), "kvgate", "kv", model.fingerprint[:16])
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            log.warning("disk tier off: cannot create %s (%s); set store.disk.path", path, e.strerror)
            return TierReport("disk", False, note=f"cannot create {path}: {e.strerror}")
    usable = free_disk_bytes(path) + tier_bytes(path)
    if tier.max_bytes:
        if tier.max_bytes > usable:
            raise ConfigError(f"store.disk.max_bytes: {tier.max_bytes} bytes exceed the {usable} bytes free "
                              f"for {path}")
        return TierReport("disk", True, tier.max_bytes // record_bytes, tier.max_bytes, "configured", path)
    nbytes = int(min(usable * tier.free_space_fraction, DISK_AUTO_MAX_BYTES))
    if nbytes // record_bytes < DISK_MIN_BLOCKS:
        log.warning("disk tier off: %.2f GiB free at %s", usable / 2**30, path)
        return TierReport("disk", False, path=path, note=f"too little free space at {path}")
    return TierReport("disk", True, nbytes // record_bytes, nbytes, "auto", path)


def open_engine(config: ServingConfig, model: LoadedModel, make_engine):
    """`make_engine(store_config)` on the planned tiers; a disk tier kvgate chose that cannot be
    opened (another kvgate holds it, ...) is turned off with a warning, a configured one is a
    ConfigError naming store.disk.path. Returns (engine, reports)."""
    store, reports = plan_tiers(config, model)
    try:
        engine = make_engine(store)
    except DiskTierError as e:
        if config.store.disk.path:
            raise ConfigError(f"store.disk.path: {e}") from None
        log.warning("disk tier off: %s", e)
        reports[2] = TierReport("disk", False, path=store.disk_path, note=str(e))
        store = replace(store, disk_path="", disk_max_bytes=0)
        engine = make_engine(store)
    return engine, reports


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_disk_bytes(path: str) -> int:
    """Free bytes on the file system that holds `path` (or would, once created)."""
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def tier_bytes(path: str) -> int:
    """Bytes an existing disk tier already takes (its space is the tier's to reuse)."""
    try:
        return os.path.getsize(os.path.join(path, "data.mdb"))
    except OSError:
        return 0
