"""Placement: where each indexed block's copies live, and how they move between tiers.

    GPU pool ──evict (demote)──► host pool ──evict──► (its disk copy stays) ──evict──► gone
        │       ◄─────promote──────                       LMDB
        └──────spill (no host room)──► disk staging ──►────┘

Owns the pools, the copier, the lock counts of the index's nodes (raised and lowered here alone)
and the per-tier counters, and asks the disk tier for writes. Keeps the radix index's placement
invariants (a parent is never slower than its child) through every move, including the ones
that fail half-way for lack of room.

Disk writes never take a host slot: a block that moves from the GPU to the host tier is written
from its host copy while it stays cached there (write-through, if the write policy says it is
worth disk bandwidth: `_worth_writing`, "auto" by default; `persist` writes the rest at
shutdown). When the host tier must evict, it takes blocks whose writes are done (or were not
wanted) first; a block whose write is still queued is evicted only after those, its write
cancelled (lost, exactly as without a disk tier); one being encoded right now is never evicted.
GPU blocks with no room in the host tier are copied into the disk tier's own staging slots by
the copier and written from there; with no staging slot free they are lost. Nothing on the
event loop copies, encodes or waits for a copy. Every block not written is counted in
`writes_skipped` by reason.
"""
from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable

from store.config import WRITE_POLICIES
from store.copier import BlockCopier
from store.disk import BlockRecord, DiskTier
from store.errors import OutOfBlocks
from store.pool import BlockPool, Tier
from store.radix import TIERS, Node, RadixIndex
from store.stats import TierCounters

log = logging.getLogger("kvgate.store")
DROPPED_KEYS_KEPT = 65536   # ~10 MB: enough to explain the misses of recent traffic


class Placement:
    def __init__(self, index: RadixIndex, gpu: BlockPool, host: BlockPool, copier: BlockCopier,
                 disk: DiskTier | None, write_policy: str = "auto") -> None:
        if write_policy not in WRITE_POLICIES:
            raise ValueError(f"write_policy must be one of {WRITE_POLICIES}, got {write_policy!r}")
        self.index = index
        self.gpu = gpu
        self.host = host
        self.copier = copier
        self.disk = disk
        self.write_policy = write_policy
        self.counters = {t: TierCounters() for t in TIERS}
        self.dropped = 0                   # blocks that left the index (no tier would keep them)
        # blocks not written to disk, by reason: "policy" (not worth it when they left the
        # GPU), "no_room" (the disk tier full of pinned blocks), "disk_busy" (evicted from the
        # host tier before their queued write ran, or no staging slot free for a spill); the
        # disk tier counts the puts it refuses itself (write queue full, writes paused)
        self.writes_skipped: collections.Counter[str] = collections.Counter()
        # GPU blocks that had no room in the host tier: "spilled" to disk through staging slots
        self.overload: collections.Counter[str] = collections.Counter()
        # host slot -> the node being written from it (its cached host copy), and its record
        self._writing: dict[int, tuple[Node, BlockRecord]] = {}
        self._orphans: set[int] = set()    # slots of _writing whose host copy went: freed when written
        self._staged: dict[int, Node] = {}   # disk staging slot -> the spilled block written from it
        # namespace (root key) -> most GPU blocks its cached prefixes should hold: above it,
        # its blocks are evicted before any other's (a tenant's `max_kv_share`)
        self.gpu_caps: dict[bytes, int] = {}
        # blocks that left the cache, the latest DROPPED_KEYS_KEPT: key -> (tier, unix time, why)
        self.dropped_keys: collections.OrderedDict[bytes, tuple[str | None, float, str]] = collections.OrderedDict()

    # ---- locks and counters -----------------------------------------------------------------

    def lock(self, nodes: list[Node]) -> None:
        self.index.lock(nodes)

    def unlock(self, nodes: list[Node]) -> None:
        self.index.unlock(nodes)
        for n in reversed(nodes):  # a load that failed under a lock left a node with no copy
            if n.fastest is None and n.lock_count == 0:
                self.forget(n, Tier.DISK, "its disk read failed")

    def count_hits(self, tiers: tuple[Tier, ...]) -> None:
        for t in tiers:
            self.counters[t].hits += 1

    def count_promotions(self, tier: Tier, n: int) -> None:
        """Blocks brought up from `tier` outside the index's moves (a sequence's own load)."""
        self.counters[tier].promotions += n

    @property
    def writing_slots(self) -> list[int]:
        """Host slots no node holds, kept until the disk write reading them is done."""
        return list(self._orphans)

    @property
    def staged_slots(self) -> list[int]:
        """Disk staging slots of spilled blocks waiting to be written."""
        return list(self._staged)

    # ---- moves ------------------------------------------------------------------------------

    def promote(self, nodes: list[Node], gpu_slots: list[int]) -> None:
        """Copy host-resident `nodes` into the (allocated) `gpu_slots`, one batch."""
        self.copier.to_gpu([n.host_slot for n in nodes], gpu_slots)
        for n, slot in zip(nodes, gpu_slots):
            self.index.set_gpu(n, slot)
        self.counters[Tier.HOST].promotions += len(nodes)

    def allocate_gpu(self, n: int) -> list[int]:
        """`n` GPU slots, evicting cached blocks (leaf-first, by priority then LRU) if needed."""
        available = self.gpu.num_free + self.index.num_cached[Tier.GPU]
        if n > available:
            raise OutOfBlocks(f"need {n} GPU blocks, {self.gpu.num_free} free and "
                              f"{self.index.num_cached[Tier.GPU]} evictable of {self.gpu.num_blocks}")
        if n > self.gpu.num_free:
            self._evict_gpu(n - self.gpu.num_free)
        return self.gpu.allocate(n)

    def _evict_gpu(self, n: int) -> None:
        """Demote `n` GPU blocks to the host tier in one batched copy (and write them through to
        disk from there). Blocks the host tier has no room for are spilled to disk, or dropped."""
        victims = self._gpu_victims(n)
        # parents first: if the host tier has too little room, the deepest blocks miss out,
        # so a parent is never slower than its child
        need_host = sorted((v for v in victims if v.host_slot is None), key=lambda v: v.depth)
        # the victims' own host copies must survive making room for the others
        host_slots = self.reserve_host(len(need_host), keep=set(victims))
        moved, no_room = need_host[:len(host_slots)], need_host[len(host_slots):]
        self.copier.to_host([v.gpu_slot for v in moved], host_slots)
        for v, slot in zip(moved, host_slots):
            self.index.set_host(v, slot)
        if self.disk is not None:
            self._write_through(moved, keep=set(victims))
            self._spill([v for v in no_room if not v.on_disk], keep=set(victims))
        freed = [v.gpu_slot for v in victims]
        for v in victims:
            self.index.set_gpu(v, None)
        self.gpu.free(freed)
        self.counters[Tier.GPU].evictions += len(victims)
        for v in reversed(no_room):
            if v.fastest is None:
                self.forget(v, Tier.GPU, "evicted from the GPU pool with no room in the host or disk tier")
            else:  # only on disk now: no descendant may stay faster than it
                self._demote_from_host([d for d in self.index.subtree(v)
                                        if d is not v and d.host_slot is not None])

    def _gpu_victims(self, n: int) -> list[Node]:
        """`n` GPU blocks to evict: first of namespaces above their cap (`gpu_caps`), as many
        as they are above it, by priority and LRU within each; then by priority and LRU."""
        chosen: list[Node] = []
        for namespace, cap in self.gpu_caps.items():
            excess = min(self.index.gpu_blocks[namespace] - cap, n - len(chosen))
            if excess > 0:
                chosen += self.index.select_victims(Tier.GPU, excess, set(chosen), namespace)
        if len(chosen) < n:
            chosen += self.index.select_victims(Tier.GPU, n - len(chosen), set(chosen))
        if len(chosen) < n:       # the first pass took the only children of what is left
            chosen = self.index.select_victims(Tier.GPU, n)
        return chosen

    def _write_through(self, nodes: list[Node], keep: set[Node]) -> None:
        """Queue disk writes of `nodes`, just given host copies, from those copies: each stays
        cached in the host tier while the disk tier's thread encodes it (after the copy lands)."""
        worth = [v for v in nodes if not v.on_disk and self._worth_writing(v)]
        self.writes_skipped["policy"] += sum(not v.on_disk for v in nodes) - len(worth)
        if worth:
            self._make_disk_room(len(worth) * self.disk.value_bytes, keep)
        for v in worth:
            self._write_from_host(v)

    def _write_from_host(self, node: Node) -> None:
        slot = node.host_slot
        record = self._write(node, self.host.bytes[slot], lambda ok: self._host_written(slot, ok))
        if record is not None:
            self._writing[slot] = (node, record)

    def _host_written(self, slot: int, ok: bool) -> None:
        node, _ = self._writing.pop(slot)
        if slot in self._orphans:
            self._orphans.discard(slot)
            self.host.free([slot])
        self._written(node, ok)

    def _spill(self, nodes: list[Node], keep: set[Node]) -> None:
        """GPU blocks with no room in the host tier: copied by the copier (a side stream; no
        wait here) into the disk tier's staging slots, and written from there. Writes may take
        half of the staging area, the reads the rest; what finds no slot is lost (counted)."""
        worth = [v for v in nodes if self._worth_writing(v)]
        self.writes_skipped["policy"] += len(nodes) - len(worth)
        staging = self.disk.staging
        room = max(0, min(staging.num_free, staging.num_blocks // 2 - len(self._staged)))
        self.writes_skipped["disk_busy"] += max(0, len(worth) - room)
        worth = worth[:room]
        if not worth:
            return
        self._make_disk_room(len(worth) * self.disk.value_bytes, keep)
        self.overload["spilled"] += self._write_staged(worth)

    def _write_staged(self, nodes: list[Node]) -> int:
        """Copy GPU blocks `nodes` into free staging slots (the copier's side stream; no wait
        here) and queue their writes from there. Returns how many were queued."""
        staging = self.disk.staging
        slots = staging.allocate(len(nodes))
        self.copier.to_host([v.gpu_slot for v in nodes], slots, staging)
        queued = 0
        for v, slot in zip(nodes, slots):
            if self._write(v, staging.bytes[slot], lambda ok, slot=slot: self._staged_written(slot, ok)):
                self._staged[slot] = v
                queued += 1
            else:
                staging.free([slot])
        return queued

    def _staged_written(self, slot: int, ok: bool) -> None:
        self.disk.staging.free([slot])
        self._written(self._staged.pop(slot), ok)

    def reserve_host(self, n: int, keep: set[Node] | frozenset = frozenset()) -> list[int]:
        """Up to `n` host slots, evicting host blocks other than those in `keep` if needed: first
        blocks with no disk write pending (written already, or not wanted), then blocks whose
        write is still queued (cancelled: lost, as without a disk tier), never a block whose
        write is under way. A write never holds a slot the host tier could use otherwise."""
        short = n - self.host.num_free
        if short > 0:
            pending = {node for node, _ in self._writing.values()}
            victims = self.index.select_victims(Tier.HOST, short, keep | pending)
            if len(victims) < short:
                busy = {node for node, record in self._writing.values() if self.disk.busy(record)}
                victims = self.index.select_victims(Tier.HOST, short, keep | busy)
            self._demote_from_host(victims)
        return self.host.allocate(min(n, self.host.num_free))

    def _demote_from_host(self, victims: list[Node]) -> None:
        """Remove the host copies of `victims` (children before parents), dropping those that
        then have no copy at all."""
        for v in victims:
            self._drop_host_copy(v)
        self.counters[Tier.HOST].evictions += len(victims)
        for v in victims:
            if v.fastest is None:
                self.forget(v, Tier.HOST, "evicted from the host tier, not written to disk (the write "
                                          "policy, a busy disk, or no room)")

    def _drop_host_copy(self, node: Node) -> None:
        """Free `node`'s host slot; a queued write from it is cancelled (the block loses its disk
        copy), one under way keeps the slot until it is done."""
        slot = node.host_slot
        self.index.set_host(node, None)
        entry = self._writing.get(slot)
        if entry is None:
            self.host.free([slot])
        elif self.disk.cancel(node.key, entry[1]):
            del self._writing[slot]
            self.host.free([slot])
            self.index.set_disk(node, False)
            self.writes_skipped["disk_busy"] += 1
        else:
            self._orphans.add(slot)

    def _worth_writing(self, node: Node) -> bool:
        """The write policy: "all" writes every block; "second-use" those used by two or more
        sequences; "auto" every block while the write queue is under half full, then only
        reused ones, so that disk bandwidth goes to what is worth keeping; "shutdown" none."""
        if self.write_policy == "all":
            return True
        if self.write_policy == "auto" and self.disk.queue_fill < 0.5:
            return True
        return self.write_policy in ("auto", "second-use") and node.uses >= 2

    def _write(self, node: Node, payload, done: Callable[[bool], None]) -> BlockRecord | None:
        """Queue `node`'s record, encoded on the disk tier's thread from `payload` (host memory
        that stays unchanged until `done(written)` is called). None if not queued."""
        disk = self.disk
        if node.key in disk.sizes:        # another node under a colliding key holds the record
            return None
        if disk.used_bytes + disk.value_bytes > disk.max_bytes:
            self.writes_skipped["no_room"] += 1
            return None
        record = BlockRecord(node.parent.key, node.token_bytes, node.depth, node.priority, payload,
                             done=done, namespace=node.mixed)
        if not disk.put(node.key, record):   # counted by the disk tier (queue full, or paused)
            return None
        self.index.set_disk(node, True)
        return record

    def _written(self, node: Node, ok: bool) -> None:
        """A write of `node` is done; if it failed, the record is lost."""
        if not ok and node.on_disk and node.key not in self.disk.sizes:
            self.lose_disk_copy(node, "its disk write failed")

    def _make_disk_room(self, nbytes: int, keep: set[Node]) -> None:
        excess = self.disk.used_bytes + nbytes - self.disk.max_bytes
        if excess <= 0:
            return
        victims = self.index.select_victims(Tier.DISK, math.ceil(excess / self.disk.value_bytes), keep)
        for v in victims:
            self.lose_disk_copy(v, "evicted from the full disk tier (priority, then least recently used)")
        self.counters[Tier.DISK].evictions += len(victims)

    def lose_disk_copy(self, node: Node, why: str = "its disk record is gone") -> None:
        """The node's disk record is gone (evicted, corrupt, failed to write): update the index,
        and drop the node if that was its last copy and nobody holds it."""
        if node.on_disk:
            self.disk.delete(node.key)
            self.index.set_disk(node, False)
        if node.fastest is None and node.lock_count == 0 and node.parent is not None:
            self.forget(node, Tier.DISK, why)

    def forget(self, node: Node, tier: Tier | None = None, why: str = "") -> None:
        """Remove an unlocked node and its subtree from the index and every tier (if still
        there: forgetting an ancestor already removed it). `tier` and `why`: the copy that went
        last and why, kept in `dropped_keys` (the miss report's "evicted")."""
        if node.parent.children.get(node.key) is not node:
            return
        if why:
            self.dropped_keys[node.key] = (None if tier is None else tier.name.lower(), time.time(), why)
            self.dropped_keys.move_to_end(node.key)
            while len(self.dropped_keys) > DROPPED_KEYS_KEPT:
                self.dropped_keys.popitem(last=False)
        for n in self.index.subtree(node):
            assert n.lock_count == 0, n
            if n.gpu_slot is not None:
                self.gpu.free([n.gpu_slot])
                self.index.set_gpu(n, None)
            if n.host_slot is not None:
                self._drop_host_copy(n)
            if n.on_disk:
                self.disk.delete(n.key)
                self.index.set_disk(n, False)
            self.index.remove(n)
            self.dropped += 1

    # ---- start-up and shutdown --------------------------------------------------------------

    def restore(self) -> None:
        """Rebuild the index from the disk tier's records (parents first), at start-up."""
        entries = self.disk.scan()
        rank = {e.key: i + 1 for i, e in enumerate(sorted(entries, key=lambda e: e.written_at))}
        nodes: dict[bytes, Node] = {}
        for e in entries:
            parent = self.index.root(e.parent) if e.depth == 0 else nodes[e.parent]
            node = nodes[e.key] = self.index.insert(parent, e.key, e.token_bytes, e.priority,
                                                    last_access=rank[e.key], namespace=e.namespace or None)
            self.index.set_disk(node, True)
        if entries:
            log.info("disk tier %s: %d cached blocks restored", self.disk.path, len(entries))

    def persist(self, deadline: float | None = None) -> tuple[int, int]:
        """Queue every cached block not yet on disk for writing, shallowest first (a record
        whose parent is not on disk is useless after a restart), until the tier is full or
        `deadline` (time.monotonic()) has passed. For a graceful shutdown: blocks the caller
        while GPU blocks are copied to host memory and full write queues drain. Returns
        (blocks queued, blocks left when the deadline passed); `flush` or `close` writes them."""
        if self.disk is None:
            return 0, 0
        todo = sorted((n for n in self.index.nodes() if not n.on_disk and n.fastest is not None),
                      key=lambda n: (n.depth, -n.priority, -n.last_access))
        self.copier.host_ready()
        written = 0
        for i, n in enumerate(todo):
            if deadline is not None and time.monotonic() > deadline:
                return written, len(todo) - i
            if not (n.parent.is_root or n.parent.on_disk):
                continue  # its prefix did not fit
            if self.disk.used_bytes + self.disk.value_bytes > self.disk.max_bytes:
                break
            self.disk.make_queue_room(self.disk.value_bytes)   # shutdown may wait; it must not drop
            from_host = n.host_slot is not None and n.host_slot not in self._writing
            if not from_host and not self.disk.staging.num_free:
                self.disk.flush_sync()              # staged writes done free their slots
            if from_host:
                self._write_from_host(n)
            elif self.disk.staging.num_free:        # a GPU block: through a staging slot, as a spill
                self._write_staged([n])
            else:                                   # every slot held by reads: a private copy
                kv = self.gpu.tensor[n.gpu_slot].cpu()
                self._write(n, kv, lambda ok, n=n: self._written(n, ok))
            written += n.on_disk
        return written, 0

    def check_integrity(self, owned_gpu: list[int], staging_reads: list[int]) -> None:
        """Every slot is free, held by one node, or in `owned_gpu` / `staging_reads` / a disk
        write in flight; the disk records are exactly the disk-resident nodes' and within the cap."""
        nodes = list(self.index.nodes())
        _check_slots(self.gpu, [n.gpu_slot for n in nodes if n.gpu_slot is not None], owned_gpu)
        _check_slots(self.host, [n.host_slot for n in nodes if n.host_slot is not None],
                     self.writing_slots)
        assert all(n.host_slot == slot for slot, (n, _) in self._writing.items() if slot not in self._orphans), \
            "a host write reads a slot its node no longer holds"
        on_disk = {n.key for n in nodes if n.on_disk}
        assert len(on_disk) == sum(n.on_disk for n in nodes), "two disk-resident nodes share a key"
        if self.disk is not None:
            _check_slots(self.disk.staging, [], staging_reads + self.staged_slots)
            self.disk.check_integrity()
            assert set(self.disk.sizes) == on_disk, "disk records != disk-resident nodes"
            assert self.disk.used_bytes <= self.disk.max_bytes, "disk tier over its cap"
        else:
            assert not on_disk, "disk-resident nodes without a disk tier"


def _check_slots(pool: BlockPool, indexed: list[int], other: list[int]) -> None:
    free = pool.free_slots()
    used = indexed + other
    assert len(set(used)) == len(used), f"{pool.tier.name}: a slot is held twice"
    assert not free & set(used), f"{pool.tier.name}: a held slot is on the free list"
    assert len(free) + len(used) == pool.num_blocks, f"{pool.tier.name}: slots leaked"
