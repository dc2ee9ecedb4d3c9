"""Disk -> host loads, and the measured disk read bandwidth.

Two kinds:
- `prefetch(match)`: the disk-only blocks of a prefix join the host tier. The load locks its
  matched path and reserves host slots; reader threads read and verify the records and write
  each payload straight into its host slot; then the blocks join the host tier
  (`Placement.loaded`). Concurrent prefetches of the same blocks share one load.
- A sequence's load (`start`): compute and load at once. The disk part of a prompt's cached
  prefix is read from its *last* block backwards, in batches, into host slots this load owns,
  while the sequence computes from the front; when the computed front reaches the loaded part,
  `take` hands over the rest (the store copies it into the sequence's GPU slots), and the
  blocks are indexed again by the sequence's commits. Neither waits for the other, so the
  first token comes sooner than with either alone (Cake, 2024). The blocks are matched by key,
  parent and tokens when read: what is read is what the prompt's blocks hold.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from store.copier import BlockCopier
from store.disk import DiskTier
from store.placement import Placement
from store.pool import BlockPool, Tier
from store.radix import Node, RadixIndex

BACK_BATCH = 32          # blocks per read batch of a sequence's load (64 MiB at the 8B shape)
SEQUENCE_SHARE = 4       # all sequences' loads together hold at most 1/SEQUENCE_SHARE of the host pool


@dataclass(eq=False)
class SequenceLoad:
    """Blocks first .. end-1 of a sequence, read from the back. Blocks [loaded_from, end) are in
    `slots` (host slots this load owns, in block order)."""
    seq_id: Hashable
    first: int
    nodes: list[Node]                          # blocks first .. end-1, as matched
    loaded_from: int = 0
    slots: list[int] = field(default_factory=list)
    reading: list[int] = field(default_factory=list)   # host slots of the batch being read
    front: int = 0                 # the sequence's computed blocks: reading below it is useless
    on_progress: Callable[[], None] = lambda: None   # after each batch read, and at the end
    keep: frozenset[Node] = frozenset()   # the prefix before `first`: its host copies stay
    done: bool = False             # nothing more will be read (all read, a record failed, or ended)
    dropped: bool = False          # the sequence ended or took its blocks: free slots when done
    task: asyncio.Task | None = field(default=None, repr=False)

    @property
    def end(self) -> int:
        return self.first + len(self.nodes)


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
        self._seq_loads: dict[Hashable, SequenceLoad] = {}   # by sequence id
        # loads their sequences dropped while a read was in flight: its slots stay reserved
        # until it ends (then `_release`)
        self._dropped: set[SequenceLoad] = set()

    @property
    def loads(self) -> set[_Load]:
        return set(self._loads.values())

    def locked_paths(self) -> Iterator[list[Node]]:
        """Every path this loader holds a lock on (for the store's integrity check)."""
        yield from (ld.path for ld in self.loads)

    def reserved_slots(self) -> list[int]:
        """Host slots of loads in flight and of sequences' loads."""
        return [s for ld in self.loads for s in ld.slots] + [s for sl in self.sequence_loads()
                                                             for s in sl.slots + sl.reading]

    def sequence_load_ids(self) -> set[Hashable]:
        """The sequences with a load (not the loads they dropped)."""
        return set(self._seq_loads)

    def sequence_loads(self) -> list[SequenceLoad]:
        """Every sequence load whose read may still be in flight, dropped ones included."""
        return [*self._seq_loads.values(), *self._dropped]

    async def prefetch(self, match) -> int:
        """Load the disk-only blocks of `match` (a PrefixMatch) into the host tier. Returns how
        many blocks this call loaded. Cancelling the caller does not cancel the load (its slots
        are written by other threads until it completes)."""
        return await self._load(match)

    # ---- a sequence's load: compute and load at once ------------------------------------------

    def start(self, seq_id: Hashable, nodes: list[Node], first: int,
              on_progress: Callable[[], None] = lambda: None) -> SequenceLoad | None:
        """Start reading nodes[first:] (blocks of sequence `seq_id`'s prompt) from the back,
        within what the other sequences' loads leave of their share of the host pool; the room
        is never made by evicting the host copies of nodes[:first]. None if there is nothing to
        read."""
        held = sum(len(sl.slots) + len(sl.reading) for sl in self.sequence_loads())
        max_slots = self.host.num_blocks // SEQUENCE_SHARE - held
        if self.disk is None or first >= len(nodes) or seq_id in self._seq_loads or max_slots < 1:
            return None
        load = SequenceLoad(seq_id, first, nodes[first:], on_progress=on_progress, keep=frozenset(nodes[:first]))
        load.loaded_from, load.front = load.end, first
        self._seq_loads[seq_id] = load
        load.task = asyncio.get_running_loop().create_task(self._read_back(load, max_slots))
        return load

    def progress(self, seq_id: Hashable, front: int) -> SequenceLoad | None:
        """The sequence's load (None if it has none), told how far the sequence has computed."""
        load = self._seq_loads.get(seq_id)
        if load is not None:
            load.front = max(load.front, front)
        return load

    def take(self, seq_id: Hashable, front: int) -> list[int]:
        """If the computed front (a block index) has reached the loaded blocks: the host slots
        of blocks front .. end-1, handed to the caller, who frees them once copied; the load
        ends. Else []."""
        load = self._seq_loads.get(seq_id)
        if load is None or front < load.loaded_from or front >= load.end:
            return []
        k = front - load.loaded_from
        taken, load.slots = load.slots[k:], load.slots[:k]
        self.drop(seq_id)
        return taken

    def drop(self, seq_id: Hashable) -> None:
        """End the sequence's load; its slots are freed now, or when its read in flight ends."""
        load = self._seq_loads.pop(seq_id, None)
        if load is None:
            return
        load.dropped = True
        if load.done:
            self._release(load)
        else:
            self._dropped.add(load)

    def _release(self, load: SequenceLoad) -> None:
        self.host.free(load.slots)
        load.slots = []
        self._dropped.discard(load)

    async def _read_back(self, load: SequenceLoad, max_slots: int) -> None:
        try:
            while load.loaded_from > max(load.first, load.front) and not load.dropped:
                lo = max(load.first, load.front, load.loaded_from - BACK_BATCH)
                room = max(0, max_slots - len(load.slots))
                slots = self.placement.reserve_host(min(load.loaded_from - lo, room), keep=load.keep)
                if not slots:
                    break
                lo = load.loaded_from - len(slots)
                nodes = load.nodes[lo - load.first:load.loaded_from - load.first]
                start = time.perf_counter()
                load.reading = slots
                ok = await self.disk.load(_records(nodes), self._sink(slots))
                load.reading = []
                self._observe(sum(ok), time.perf_counter() - start)
                for node, read in zip(nodes, ok):
                    if not read and node.on_disk and node.key not in self.disk.sizes:
                        self.placement.lose_disk_copy(node)      # a corrupt record, deleted
                good = len(ok)                  # the loaded part must reach the end unbroken
                while good and ok[good - 1]:
                    good -= 1
                self.host.free(slots[:good])
                load.slots[:0] = slots[good:]
                load.loaded_from -= len(ok) - good
                if good:
                    break
                load.on_progress()
        finally:
            self.host.free(load.reading)       # a read that failed
            load.reading = []
            load.done = True
            if load.dropped:
                self._release(load)
            load.on_progress()

    def _sink(self, slots: list[int]) -> Callable[[int, memoryview], None]:
        """Where a read puts record i's payload: host slot slots[i] (called on a reader thread,
        after `host_ready`)."""
        def sink(i: int, payload: memoryview) -> None:
            self.host.tensor[slots[i]].view(torch.uint8).numpy().reshape(-1)[:] = payload
        return sink

    def _observe(self, blocks: int, seconds: float) -> None:
        """Bytes/s read and checked, newest loads weighing most."""
        if blocks:
            rate = blocks * self.host.layout.block_bytes / max(seconds, 1e-9)
            self.read_rate = rate if self.read_rate is None else 0.8 * self.read_rate + 0.2 * rate

    async def measure(self, max_bytes: int = 256 << 20) -> float | None:
        """Seed `read_rate` by reading (and verifying) up to `max_bytes` of records already on
        disk, as a load would, into no slot; None if the tier is empty or absent. (Records just
        written may come from the page cache: then loads will be slower than measured.)"""
        if self.disk is None or not self.disk.sizes:
            return None
        block_bytes = self.host.layout.block_bytes
        nodes = list(itertools.islice((n for n in self.index.nodes() if n.on_disk), max(1, max_bytes // block_bytes)))
        start = time.perf_counter()
        ok = await self.disk.load(_records(nodes), lambda i, p: None)
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
        ok: list[bool] | None = None
        start = time.perf_counter()
        try:
            ok = await self.disk.load(_records(load.nodes), self._sink(load.slots))
        finally:
            for n in load.nodes:
                del self._loads[n]
            self.placement.loaded(load.nodes, load.slots, ok)
            self.placement.unlock(load.path)
        if ok is not None:
            self._observe(len(ok), time.perf_counter() - start)
        return sum(_is_live(n) and n.host_slot is not None for n in load.nodes)


def _records(nodes: Sequence[Node]) -> list[tuple[bytes, bytes, bytes]]:
    """What a read checks each record against: (key, parent key, token bytes) of its node."""
    return [(n.key, n.parent.key, n.token_bytes) for n in nodes]


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
