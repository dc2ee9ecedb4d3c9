"""The store's configuration: the tiers' sizes and the disk tier's write policy. Imports nothing
heavy: the server validates its configuration file against it before loading anything."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from store.pool import BlockLayout

# which blocks leaving the GPU are written to disk (store/placement.py; docs/store.md)
WRITE_POLICIES = ("auto", "all", "second-use", "shutdown")


@dataclass(frozen=True)
class StoreConfig:
    """Sizes of the tiers. `disk_path` empty = no disk tier."""
    block_size: int = 16
    gpu_blocks: int = 256
    host_blocks: int = 0
    disk_path: str = ""
    disk_max_bytes: int = 0
    write_policy: str = "auto"   # which blocks leaving the GPU are written to disk (Placement)
    staging_bytes: int = 64 << 20  # GPU staging buffer for copies to/from scattered GPU slots
    disk_staging_bytes: int = 512 << 20   # the disk tier's own pinned staging area

    def __post_init__(self) -> None:
        for name in ("block_size", "gpu_blocks", "staging_bytes", "disk_staging_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"store.{name} must be >= 1, got {getattr(self, name)}")
        if self.host_blocks < 0:
            raise ValueError(f"store.host_blocks must be >= 0, got {self.host_blocks}")
        if self.disk_path and self.disk_max_bytes <= 0:
            raise ValueError("store.disk_max_bytes must be > 0 when store.disk_path is set")
        if self.write_policy not in WRITE_POLICIES:
            raise ValueError(f"store.write_policy must be one of {', '.join(WRITE_POLICIES)}")


def disk_staging_blocks(config: StoreConfig, layout: BlockLayout) -> int:
    """Blocks of the disk tier's staging area: `disk_staging_bytes`, at least 16 blocks (two
    reads in flight), at most 1024."""
    return max(16, min(1024, config.disk_staging_bytes // layout.block_bytes)) if config.disk_path else 0
