"""Placement: where each indexed block's copies live, and how they move between tiers.

    GPU pool ──evict (demote)──► host pool ──evict (write)──► LMDB ──evict──► gone
             ◄─────promote──────           ◄──prefetch (load)─

Owns the pools, the copier, the disk tier, the lock counts of the index's nodes (raised and
lowered here alone) and the per-tier counters. Keeps the radix index's placement invariants (a
parent is never slower than its child) through every move, including the ones that fail
half-way for lack of room.

Disk writes: a block leaving the host tier is written only if the write policy says it is worth
disk bandwidth (`_worth_writing`; "auto" by default; `persist` writes the rest at shutdown). Its
host slot stays reserved until the disk tier's thread has encoded it from there (no copy, no
encoding on the event loop). Every block not written is counted in `writes_skipped` by reason.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time

import torch

from store.copier import BlockCopier
from store.disk import BlockRecord, DiskTier
from store.errors import OutOfBlocks
from store.pool import BlockPool, Tier
from store.radix import TIERS, Node, RadixIndex
from store.stats import TierCounters

log = logging.getLogger("kvgate.store")

WRITE_POLICIES = ("auto", "all", "second-use", "shutdown")


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
        # blocks that left the cache's fast tiers unwritten, by reason: "policy" (not worth
        # it), "no_room" (the disk tier full of pinned blocks); the disk tier counts the puts
        # it refuses itself (write queue full, writes paused)
        self.writes_skipped: collections.Counter[str] = collections.Counter()
        # work done on the event loop because the host tier ran short: "spilled", GPU blocks
        # written to disk through a synchronous copy; "detached", queued writes given a private
        # copy so that their host slots could be reused
        self.overload: collections.Counter[str] = collections.Counter()
        # host slot -> the node being written from it, and its record
        self._writing: dict[int, tuple[Node, BlockRecord]] = {}
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
        """Host slots reserved for disk writes in flight."""
        return list(self._writing)

    # ---- moves ------------------------------------------------------------------------------

    def promote(self, nodes: list[Node], gpu_slots: list[int]) -> None:
        """Copy host-resident `nodes` into the (allocated) `gpu_slots`, one batch."""
        self.copier.to_gpu([n.host_slot for n in nodes], gpu_slots)
        for n, slot in zip(nodes, gpu_slots):
            self.index.set_gpu(n, slot)
        self.counters[Tier.HOST].promotions += len(nodes)

    def loaded(self, nodes: list[Node], host_slots: list[int], ok: list[bool] | None) -> None:
        """Apply a disk -> host load: `ok[i]` says whether node i's record was valid and is now
        in host_slots[i]; None means the load did not run (its slots are just freed)."""
        for i, (n, slot) in enumerate(zip(nodes, host_slots)):
            if ok is not None and ok[i]:
                self.index.set_host(n, slot)
                self.counters[Tier.DISK].promotions += 1
            else:
                self.host.free([slot])
                if ok is not None and not ok[i]:  # missing or corrupt record (already deleted)
                    self.lose_disk_copy(n, "its disk record was missing or corrupt")

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
        """Demote `n` GPU blocks to the host tier in one batched copy. Blocks the host tier has
        no room for (its slots pinned or being written) are spilled to disk, or dropped."""
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
        spill = [v for v in no_room if not v.on_disk]
        if spill and self.disk is not None:
            self._spill(spill, keep=set(victims))
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

    def _spill(self, nodes: list[Node], keep: set[Node]) -> None:
        """Write GPU blocks the host tier has no room for (its slots pinned or being written)
        straight to disk, through a private copy: a synchronous copy on this thread, after the
        kernels that wrote them. The overload path; the policy still decides what is worth it."""
        worth = [v for v in nodes if self._worth_writing(v)]
        self.writes_skipped["policy"] += len(nodes) - len(worth)
        if not worth:
            return
        self._make_disk_room(len(worth) * self.disk.value_bytes, keep)
        self.overload["spilled"] += len(worth)
        slots = torch.tensor([v.gpu_slot for v in worth], device=self.gpu.tensor.device)
        for v, kv in zip(worth, self.gpu.tensor[slots].cpu()):
            self._write(v, None, kv)

    def reserve_host(self, n: int, keep: set[Node] | frozenset = frozenset()) -> list[int]:
        """Up to `n` host slots. Room comes first from queued disk writes, which hold the slots
        of blocks already gone from the host tier (each given a private copy), then from
        evicting host blocks (to disk) other than those in `keep` — as few as it takes: a
        demoted block's write holds its slot, and that slot is freed the same way, never by
        evicting another block (which once emptied the whole host tier onto the disk)."""
        while n > self.host.num_free:
            if self._writing:
                self._detach_writes(n - self.host.num_free)
                if n <= self.host.num_free:
                    break
            victims = self.index.select_victims(Tier.HOST, n - self.host.num_free, keep)
            if not victims:
                break
            self._demote_from_host(victims)
        return self.host.allocate(min(n, self.host.num_free))

    def _detach_writes(self, n: int) -> None:
        """Free up to `n` host slots held by queued writes by giving those records a private
        copy of their block (a copy on this thread: only when the host tier runs short)."""
        self.copier.host_ready()
        for slot, (node, record) in list(self._writing.items()):
            if n <= 0:
                break
            copy = dataclasses.replace(record, payload=record.payload.clone(),
                                       done=lambda ok, node=node: self._written(node, None, ok))
            if self.disk.replace_queued(node.key, record, copy):
                del self._writing[slot]
                self.host.free([slot])
                self.overload["detached"] += 1
                n -= 1

    def _demote_from_host(self, victims: list[Node]) -> None:
        """Remove the host copies of `victims` (children before parents), writing those that
        have no other copy to disk if the write policy wants them, and dropping those that
        then have no copy at all."""
        to_write = []
        if self.disk is not None:
            unwritten = [v for v in victims if not v.on_disk and v.gpu_slot is None]
            to_write = [v for v in unwritten if self._worth_writing(v)]
            self.writes_skipped["policy"] += len(unwritten) - len(to_write)
            if to_write:
                self._make_disk_room(len(to_write) * self.disk.value_bytes, keep=set(victims))
        writing = set(to_write)
        for v in victims:
            slot = v.host_slot
            if not (v in writing and self._write(v, slot)):
                self.host.free([slot])
            self.index.set_host(v, None)
        self.counters[Tier.HOST].evictions += len(victims)
        for v in victims:
            if v.fastest is None:
                self.forget(v, Tier.HOST, "evicted from the host tier, not written to disk (the write "
                                          "policy, or no room)")

    def _worth_writing(self, node: Node) -> bool:
        """The write policy: "all" writes every block; "second-use" those used by two or more
        sequences; "auto" every block while the write queue is under half full, then only
        reused ones, so that disk bandwidth goes to what is worth keeping; "shutdown" none."""
        if self.write_policy == "all":
            return True
        if self.write_policy == "auto" and self.disk.queue_fill < 0.5:
            return True
        return self.write_policy in ("auto", "second-use") and node.uses >= 2

    def _write(self, node: Node, host_slot: int | None, payload: torch.Tensor | None = None) -> bool:
        """Queue `node`'s record, encoded from `host_slot` (kept reserved until it is written)
        or from `payload`, a private copy."""
        disk = self.disk
        if node.key in disk.sizes:        # another node under a colliding key holds the record
            return False
        if disk.used_bytes + disk.value_bytes > disk.max_bytes:
            self.writes_skipped["no_room"] += 1
            return False
        record = BlockRecord(node.parent.key, node.token_bytes, node.depth, node.priority,
                             self.host.tensor[host_slot] if payload is None else payload,
                             done=lambda ok: self._written(node, host_slot, ok), namespace=node.mixed)
        if not disk.put(node.key, record):   # counted by the disk tier (queue full, or paused)
            return False
        self.index.set_disk(node, True)
        if host_slot is not None:
            self._writing[host_slot] = (node, record)
        return True

    def _written(self, node: Node, host_slot: int | None, ok: bool) -> None:
        """The disk tier is done with `host_slot` (None: the record had its own copy); if the
        write failed, the record is lost."""
        if host_slot is not None:
            del self._writing[host_slot]
            self.host.free([host_slot])
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
                self.host.free([n.host_slot])
                self.index.set_host(n, None)
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
            on_host = n.host_slot is not None
            kv = self.host.tensor[n.host_slot] if on_host else self.gpu.tensor[n.gpu_slot].cpu()
            written += self._write(n, None, kv)     # the host copy stays indexed: no slot to hold
        return written, 0

    def check_integrity(self, owned_gpu: list[int], reserved_host: list[int]) -> None:
        """Every slot is free, held by one node, or in `owned_gpu` / `reserved_host` / a disk
        write in flight; the disk records are exactly the disk-resident nodes' and within the cap."""
        nodes = list(self.index.nodes())
        _check_slots(self.gpu, [n.gpu_slot for n in nodes if n.gpu_slot is not None], owned_gpu)
        _check_slots(self.host, [n.host_slot for n in nodes if n.host_slot is not None],
                     reserved_host + self.writing_slots)
        on_disk = {n.key for n in nodes if n.on_disk}
        assert len(on_disk) == sum(n.on_disk for n in nodes), "two disk-resident nodes share a key"
        if self.disk is not None:
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
