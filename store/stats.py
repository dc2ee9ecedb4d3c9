"""Counters and snapshots of the store's state, per tier."""
from __future__ import annotations

from dataclasses import dataclass

from store.disk import DiskCounters
from store.pool import Tier


@dataclass
class TierCounters:
    """Running totals for one tier (mutated only by Placement)."""
    hits: int = 0         # prompt blocks found at admission whose fastest copy was here
    evictions: int = 0    # copies removed from this tier to make room
    promotions: int = 0   # blocks brought up from this tier (host -> GPU, disk -> host)


@dataclass(frozen=True)
class TierStats:
    """Blocks of one tier: capacity = free + cached + locked (check_integrity asserts it for
    the pools). cached = evictable copies of indexed blocks; locked = blocks in use."""
    capacity: int
    free: int
    cached: int
    locked: int
    hits: int
    evictions: int
    promotions: int


@dataclass(frozen=True)
class StoreStats:
    tiers: dict[Tier, TierStats]
    misses: int                 # prompt blocks found in no tier at admission
    dropped: int                # blocks that left the index because no tier would keep them
    disk_bytes: int             # bytes of records on disk (or queued to be written)
    disk: DiskCounters | None   # I/O counters of the disk tier, None without one
    writes_skipped: dict[str, int]   # blocks that left the host tier unwritten, by reason (Placement)
    overload: dict[str, int]         # blocks copied on the event loop as the host tier ran short (Placement)
