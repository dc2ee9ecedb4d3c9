"""Disk -> host loads: prefetches of matched prefixes, the holds that keep a loaded prefix for
the request that will use it, and the measured disk read bandwidth.

A load locks its matched path and reserves host slots; the disk tier's thread reads and verifies
the records and writes each payload straight into its host slot; then the blocks join the host
tier (`Placement.loaded`). Concurrent prefetches of the same blocks share one load.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from store.copier import BlockCopier
from store.disk import DiskTier
from store.placement import Placement
from store.pool import BlockPool, Tier
from store.radix import Node, RadixIndex


@dataclass(eq=False)
class _Load:
    """A disk -> host load in flight: its path stays locked and its host slots reserved."""
    path: list[Node]               # the matched prefix up to the last block loaded
    nodes: list[Node]              # the blocks being loaded, one per slot
    slots: list[int]
    task: asyncio.Task | None = field(default=None, repr=False)


class DiskLoader:
    def __init__(self, index: RadixIndex, placement: Placement, gpu: BlockPool, host: BlockPool,
                 copier: BlockCopier, disk: DiskTier | None) -> None:
        self.index = index
        self.placement = placement
        self.gpu = gpu
        self.host = host
        self.copier = copier
        self.disk = disk
        self.read_rate: float | None = None            # bytes/s read and verified (moving average)
        self._loads: dict[Node, _Load] = {}
        self._holds: dict[Hashable, list[Node]] = {}   # prefetched prefixes kept for their request

    @property
    def loads(self) -> set[_Load]:
        return set(self._loads.values())

    def locked_paths(self) -> Iterator[list[Node]]:
        """Every path this loader holds a lock on (for the store's integrity check)."""
        yield from (ld.path for ld in self.loads)
        yield from self._holds.values()

    async def prefetch(self, match, hold: Hashable | None = None) -> int:
        """Load the disk-only blocks of `match` (a PrefixMatch) into the host tier. Returns how
        many blocks this call loaded. Cancelling the caller does not cancel the load (its slots
        are written by another thread until it completes).

        With `hold` (the id of the sequence that will be admitted with it), the loaded prefix
        stays locked until `unhold(hold)` (the store's `admit` calls it once the sequence holds
        its own locks), so that other requests' evictions cannot undo the load while it waits
        its turn; but only while all holds together pin at most a quarter of the GPU pool and
        half of the host pool: a waiting request must never keep running ones from their blocks."""
        loaded = await self._load(match)
        if hold is not None:
            path = [n for n in live_prefix(match.nodes) if n.fastest <= Tier.HOST]
            held = collections.Counter(n.fastest for p in [path, *self._holds.values()] for n in p)
            if held[Tier.GPU] <= self.gpu.num_blocks // 4 and held[Tier.HOST] <= self.host.num_blocks // 2:
                self.unhold(hold)
                self.placement.lock(path)
                self._holds[hold] = path
        return loaded

    def hold_ids(self) -> set[Hashable]:
        return set(self._holds)

    def unhold(self, hold: Hashable) -> None:
        """Let go of what `prefetch(..., hold)` kept (no-op if nothing)."""
        self.placement.unlock(self._holds.pop(hold, []))

    async def measure(self, max_bytes: int = 256 << 20) -> float | None:
        """Seed `read_rate` by reading (and verifying) up to `max_bytes` of records already on
        disk, as a load would, into no slot; None if the tier is empty or absent. (Records just
        written may come from the page cache: then loads will be slower than measured.)"""
        if self.disk is None or not self.disk.sizes:
            return None
        block_bytes = self.host.layout.block_bytes
        nodes = list(itertools.islice((n for n in self.index.nodes() if n.on_disk), max(1, max_bytes // block_bytes)))
        start = time.perf_counter()
        ok = await self.disk.load([(n.key, n.parent.key, n.token_bytes) for n in nodes], lambda i, p: None)
        if any(ok):
            self.read_rate = sum(ok) * block_bytes / max(time.perf_counter() - start, 1e-9)
        return self.read_rate

    async def _load(self, match) -> int:
        while True:
            path = live_prefix(match.nodes)
            busy = {self._loads[n].task for n in path if n in self._loads}
            if not busy:
                break
            await asyncio.wait(busy)
        todo = [n for n in path if n.fastest is Tier.DISK]  # a suffix: parents are never slower
        if not todo or self.disk is None:
            return 0
        self.placement.lock(path)  # before reserving host slots, which may evict host blocks
        slots = self.placement.reserve_host(len(todo))
        if not slots:
            self.placement.unlock(path)
            return 0
        load = _Load(path, todo[:len(slots)], slots)
        for n in load.nodes:
            self._loads[n] = load
        load.task = asyncio.get_running_loop().create_task(self._run(load))
        return await asyncio.shield(load.task)

    async def _run(self, load: _Load) -> int:
        def sink(i: int, payload: memoryview) -> None:  # on a reader thread, after `host_ready`
            self.host.tensor[load.slots[i]].view(torch.uint8).numpy().reshape(-1)[:] = payload
        ok: list[bool] | None = None
        start = time.perf_counter()
        try:
            ok = await self.disk.load([(n.key, n.parent.key, n.token_bytes) for n in load.nodes], sink)
        finally:
            for n in load.nodes:
                del self._loads[n]
            self.placement.loaded(load.nodes, load.slots, ok)
            self.placement.unlock(load.path)
        loaded = sum(_is_live(n) and n.host_slot is not None for n in load.nodes)
        if ok is not None:   # bytes read (and checked) per second, newest loads weighing most
            rate = len(ok) * self.host.layout.block_bytes / max(time.perf_counter() - start, 1e-9)
            self.read_rate = rate if self.read_rate is None else 0.8 * self.read_rate + 0.2 * rate
        return loaded


def _is_live(node: Node) -> bool:
    """Still indexed (not forgotten since a caller saw it) and holding a copy."""
    return node.fastest is not None and node.parent.children.get(node.key) is node


def live_prefix(nodes: Sequence[Node]) -> list[Node]:
    """The leading nodes of a (possibly stale) match that are still live."""
    live = []
    for n in nodes:
        if not _is_live(n):
            break
        live.append(n)
    return live
