"""Disk reads: a sequence's load (compute and load at once), and the measured disk read
bandwidth.

- A sequence's load (`start`): the disk part of a prompt's cached prefix, or the part of it the
  engine expects to arrive before its computed front would reach it (`stop`), is read from its
  *last* block backwards, in batches, into the disk tier's own staging slots (never a host-tier
  slot), while the sequence computes from the front. Once the sequence is admitted, what arrived
  is copied into its GPU slots (`BlockStore.advance_load`) and the staging slots are free again;
  when the computed front reaches the blocks read, the sequence jumps past them, and they are
  indexed again by its commits. Neither waits for the other, so the first token comes no later
  than with the tier off, and sooner when the read covers anything (Cake, 2024). The blocks are
  matched by key, parent and tokens when read: what is read is what the prompt's blocks hold.
"""
from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from store.disk import DiskTier
from store.placement import Placement
from store.radix import Node, RadixIndex

BACK_BATCH = 32          # blocks per read batch of a sequence's load (64 MiB at the 8B shape)
STALLED_S = 2.0          # a batch read for longer than this (and 4x its expected time): the disk is stalled


@dataclass(eq=False)
class SequenceLoad:
    """Blocks first .. end-1 of a sequence, to be read from the back down to `stop`. Blocks
    [loaded_from, end) have arrived: those in `staged` (block -> staging slot) are waiting to be
    copied into the sequence's GPU slots, the others are there."""
    seq_id: Hashable
    first: int
    nodes: list[Node]                          # blocks first .. end-1, as matched
    stop: int = 0                  # reading stops here (the expected meeting point)
    loaded_from: int = 0
    staged: dict[int, int] = field(default_factory=dict)
    reading: list[int] = field(default_factory=list)   # staging slots of the batch being read
    reading_since: float | None = None                 # time.monotonic() the batch was asked for
    front: int = 0                 # the sequence's computed blocks: reading below it is useless
    on_progress: Callable[[], None] = lambda: None   # after each batch read, and at the end
    done: bool = False             # nothing more will be read (all read, a record failed, or ended)
    dropped: bool = False          # the sequence ended or took its blocks: free slots when done
    task: asyncio.Task | None = field(default=None, repr=False)

    @property
    def end(self) -> int:
        return self.first + len(self.nodes)

    @property
    def to_read(self) -> int:
        """Blocks still to be read (until the front or the stop)."""
        return 0 if self.done else max(0, self.loaded_from - max(self.stop, self.front))   # stop >= first


class DiskLoader:
    def __init__(self, index: RadixIndex, placement: Placement, block_bytes: int, disk: DiskTier | None) -> None:
        self.index = index
        self.placement = placement
        self.block_bytes = block_bytes
        self.disk = disk
        self.staging = disk.staging if disk is not None else None
        self.read_rate: float | None = None            # bytes/s read and verified (moving average)
        self._seq_loads: dict[Hashable, SequenceLoad] = {}   # by sequence id
        # loads their sequences dropped while a read was in flight: its slots stay reserved
        # until it ends (then `_release`)
        self._dropped: set[SequenceLoad] = set()
        self._room = asyncio.Event()     # staging slots were freed: loads waiting for room go on

    def staging_slots(self) -> list[int]:
        """Staging slots of sequences' loads (read, or being read)."""
        return [s for sl in self.sequence_loads() for s in [*sl.staged.values(), *sl.reading]]

    def sequence_load_ids(self) -> set[Hashable]:
        """The sequences with a load (not the loads they dropped)."""
        return set(self._seq_loads)

    def sequence_loads(self) -> list[SequenceLoad]:
        """Every sequence load whose read may still be in flight, dropped ones included."""
        return [*self._seq_loads.values(), *self._dropped]

    def queued_bytes(self) -> int:
        """Bytes the sequences' loads still mean to read: what a new load waits behind."""
        return sum(sl.to_read for sl in self._seq_loads.values()) * self.block_bytes

    def stalled(self) -> bool:
        """Has a batch been read for far longer than the measured rate says it should take?"""
        now = time.monotonic()
        for sl in self.sequence_loads():
            if sl.reading_since is not None:
                expected = (len(sl.reading) * self.block_bytes / self.read_rate
                            if self.read_rate else 0.0)
                if now - sl.reading_since > max(STALLED_S, 4 * expected):
                    return True
        return False

    # ---- a sequence's load: compute and load at once ------------------------------------------

    def start(self, seq_id: Hashable, nodes: list[Node], first: int, stop: int = 0,
              on_progress: Callable[[], None] = lambda: None) -> SequenceLoad | None:
        """Start reading nodes[max(first, stop):] (blocks of sequence `seq_id`'s prompt) from
        the back into staging slots. None if there is nothing to read."""
        stop = max(first, stop)
        if self.disk is None or stop >= len(nodes) or seq_id in self._seq_loads or not self.staging.num_blocks:
            return None
        load = SequenceLoad(seq_id, first, nodes[first:], stop=stop, on_progress=on_progress)
        load.loaded_from, load.front = load.end, first
        self._seq_loads[seq_id] = load
        load.task = asyncio.get_running_loop().create_task(self._read_back(load))
        return load

    def progress(self, seq_id: Hashable, front: int) -> SequenceLoad | None:
        """The sequence's load (None if it has none), told how far the sequence has computed."""
        load = self._seq_loads.get(seq_id)
        if load is not None:
            load.front = max(load.front, front)
        return load

    def unstage(self, seq_id: Hashable) -> list[tuple[int, int]]:
        """(block, staging slot) of the blocks the sequence's load has read and its front has
        not computed, handed to the caller, who copies them and then calls `free_staging`;
        the staging slots of blocks the front computed meanwhile are freed now."""
        load = self._seq_loads[seq_id]
        taken = sorted((b, s) for b, s in load.staged.items() if b >= load.front)
        self.free_staging([s for b, s in load.staged.items() if b < load.front])
        load.staged = {}
        return taken

    def free_staging(self, slots: list[int]) -> None:
        if slots:
            self.staging.free(slots)
            self._room.set()

    def drop(self, seq_id: Hashable) -> None:
        """End the sequence's load; its slots are freed now, or when its read in flight ends."""
        load = self._seq_loads.pop(seq_id, None)
        if load is None:
            return
        load.dropped = True
        self._room.set()             # a read waiting for room sees it is dropped
        if load.done:
            self._release(load)
        else:
            self._dropped.add(load)

    def _release(self, load: SequenceLoad) -> None:
        self.free_staging(list(load.staged.values()))
        load.staged = {}
        self._dropped.discard(load)

    async def _read_back(self, load: SequenceLoad) -> None:
        # one load holds at most half the staging area (before its sequence is admitted, what
        # it read waits there)
        cap = max(1, self.staging.num_blocks // 2)
        try:
            while load.to_read and not load.dropped:
                want = min(load.to_read, BACK_BATCH, cap - len(load.staged))
                slots = self.staging.allocate(min(want, self.staging.num_free)) if want > 0 else []
                if not slots:
                    self._room.clear()
                    await self._room.wait()
                    continue
                lo = load.loaded_from - len(slots)
                nodes = load.nodes[lo - load.first:load.loaded_from - load.first]
                start = time.perf_counter()
                load.reading, load.reading_since = slots, time.monotonic()
                ok = await self.disk.load(_records(nodes), self.staging, slots)
                load.reading, load.reading_since = [], None
                self._observe(sum(ok), time.perf_counter() - start)
                for node, read in zip(nodes, ok):
                    if not read and node.on_disk and node.key not in self.disk.sizes:
                        self.placement.lose_disk_copy(node)      # a corrupt record, deleted
                good = len(ok)                  # the loaded part must reach the end unbroken
                while good and ok[good - 1]:
                    good -= 1
                self.free_staging(slots[:good])
                load.staged.update(zip(range(lo + good, load.loaded_from), slots[good:]))
                load.loaded_from -= len(ok) - good
                if good:
                    break
                load.on_progress()
        finally:
            self.free_staging(load.reading)       # a read that failed
            load.reading, load.reading_since = [], None
            load.done = True
            if load.dropped:
                self._release(load)
            load.on_progress()

    def _observe(self, blocks: int, seconds: float) -> None:
        """Bytes/s read and checked, newest loads weighing most."""
        if blocks:
            rate = blocks * self.block_bytes / max(seconds, 1e-9)
            self.read_rate = rate if self.read_rate is None else 0.8 * self.read_rate + 0.2 * rate

    async def measure(self, max_bytes: int = 256 << 20) -> float | None:
        """Seed `read_rate` by reading (and verifying) up to `max_bytes` of records already on
        disk, as a load would, into no slot; None if the tier is empty or absent. (Records just
        written may come from the page cache: then loads will be slower than measured.)"""
        if self.disk is None or not self.disk.sizes:
            return None
        block_bytes = self.block_bytes
        nodes = list(itertools.islice((n for n in self.index.nodes() if n.on_disk), max(1, max_bytes // block_bytes)))
        start = time.perf_counter()
        ok = await self.disk.load(_records(nodes))
        if any(ok):
            self.read_rate = sum(ok) * block_bytes / max(time.perf_counter() - start, 1e-9)
        return self.read_rate


def _records(nodes: Sequence[Node]) -> list[tuple[bytes, bytes, bytes]]:
    """What a read checks each record against: (key, parent key, token bytes) of its node."""
    return [(n.key, n.parent.key, n.token_bytes) for n in nodes]
