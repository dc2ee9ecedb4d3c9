"""Placement: where each indexed block's copies live, and how they move between tiers.

    GPU pool ──evict (demote)──► host pool ──evict (write)──► LMDB ──evict──► gone
             ◄─────promote──────           ◄──prefetch (load)─

Owns the pools, the copier, the disk tier and its record map, and the per-tier counters.
Keeps the radix index's placement invariants (a parent is never slower than its child) through
every move, including the ones that fail half-way for lack of room.
"""
from __future__ import annotations

import logging
import math

import torch

from store.copier import BlockCopier
from store.disk import DiskTier
from store.errors import OutOfBlocks
from store.pool import BlockPool, Tier
from store.radix import TIERS, Node, RadixIndex
from store.stats import TierCounters

log = logging.getLogger("kvgate.store")


class Placement:
    def __init__(self, index: RadixIndex, gpu: BlockPool, host: BlockPool, copier: BlockCopier,
                 disk: DiskTier | None) -> None:
        self.index = index
        self.gpu = gpu
        self.host = host
        self.copier = copier
        self.disk = disk
        self.counters = {t: TierCounters() for t in TIERS}
        self.dropped = 0                   # blocks that left the index (no tier would keep them)
        self.disk_nodes: dict[bytes, Node] = {}  # key -> the node whose record is on disk
        if disk is not None:
            disk.on_lost = self._on_disk_lost

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
            else:
                self.host.free([slot])
                if ok is not None:  # missing or corrupt record (already deleted)
                    self.lose_disk_copy(n)

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
        no room for (its blocks all pinned) go straight to disk, or are dropped without one."""
        victims = self.index.select_victims(Tier.GPU, n)
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
            # a synchronous copy on the compute stream: after the kernels that wrote the blocks
            slots = torch.tensor([v.gpu_slot for v in spill], device=self.gpu.tensor.device)
            blocks = self.gpu.tensor[slots].cpu()
            self._make_disk_room(len(spill) * self.disk.value_bytes, keep=set(victims))
            for v, kv in zip(spill, blocks):
                self._write_to_disk(v, kv)
        freed = [v.gpu_slot for v in victims]
        for v in victims:
            self.index.set_gpu(v, None)
        self.gpu.free(freed)
        self.counters[Tier.GPU].evictions += len(victims)
        for v in reversed(no_room):
            if v.fastest is None:
                self.forget(v)
            else:  # only on disk now: no descendant may stay faster than it
                self._demote_from_host([d for d in self.index.subtree(v)
                                        if d is not v and d.host_slot is not None])

    def reserve_host(self, n: int, keep: set[Node] | frozenset = frozenset()) -> list[int]:
        """Up to `n` host slots, evicting host blocks (to disk), except those in `keep`."""
        if n > self.host.num_free:
            self._demote_from_host(self.index.select_victims(Tier.HOST, n - self.host.num_free, keep))
        return self.host.allocate(min(n, self.host.num_free))

    def _demote_from_host(self, victims: list[Node]) -> None:
        """Remove the host copies of `victims` (children before parents), writing those that
        have no other copy to disk, and dropping those that then have no copy at all."""
        to_disk = [v for v in victims if not v.on_disk and v.gpu_slot is None]
        if to_disk and self.disk is not None:
            self._make_disk_room(len(to_disk) * self.disk.value_bytes, keep=set(victims))
            self.copier.host_ready()  # the host copies must have landed before we read them
            for v in to_disk:
                self._write_to_disk(v, self.host.tensor[v.host_slot])
        for v in victims:
            slot = v.host_slot
            self.index.set_host(v, None)
            self.host.free([slot])
        self.counters[Tier.HOST].evictions += len(victims)
        for v in victims:
            if v.fastest is None:
                self.forget(v)

    def _write_to_disk(self, node: Node, kv: torch.Tensor) -> bool:
        """Queue `node`'s record (`kv` is its block, in host memory) if the tier has room."""
        disk = self.disk
        if node.key in self.disk_nodes:  # another node under a colliding key holds the record
            return False
        try:
            value = disk.encode(node.parent.key, node.token_bytes, node.depth, node.priority, kv)
        except (OverflowError, ValueError) as e:   # admit refuses what cannot be encoded; never
            log.error("disk tier: block %s cannot be encoded (%s); not written", node.key.hex(), e)
            return False                           # let one block stop an eviction half-way
        if disk.used_bytes + len(value) > disk.max_bytes or not disk.put(node.key, value):
            return False
        self.index.set_disk(node, True)
        self.disk_nodes[node.key] = node
        return True

    def _make_disk_room(self, nbytes: int, keep: set[Node]) -> None:
        excess = self.disk.used_bytes + nbytes - self.disk.max_bytes
        if excess <= 0:
            return
        victims = self.index.select_victims(Tier.DISK, math.ceil(excess / self.disk.value_bytes), keep)
        for v in victims:
            self.lose_disk_copy(v)
        self.counters[Tier.DISK].evictions += len(victims)

    def lose_disk_copy(self, node: Node) -> None:
        """The node's disk record is gone (evicted, corrupt, failed to write): update the index,
        and drop the node if that was its last copy and nobody holds it."""
        if self.disk_nodes.get(node.key) is node:
            del self.disk_nodes[node.key]
            self.disk.delete(node.key)
        if node.on_disk:
            self.index.set_disk(node, False)
        if node.fastest is None and node.lock_count == 0 and node.parent is not None:
            self.forget(node)

    def _on_disk_lost(self, keys: list[bytes]) -> None:
        for key in keys:
            node = self.disk_nodes.get(key)
            if node is not None:
                self.lose_disk_copy(node)

    def forget(self, node: Node) -> None:
        """Remove an unlocked node and its subtree from the index and every tier (if still
        there: forgetting an ancestor already removed it)."""
        if node.parent.children.get(node.key) is not node:
            return
        for n in self.index.subtree(node):
            assert n.lock_count == 0, n
            if n.gpu_slot is not None:
                self.gpu.free([n.gpu_slot])
                self.index.set_gpu(n, None)
            if n.host_slot is not None:
                self.host.free([n.host_slot])
                self.index.set_host(n, None)
            if n.on_disk:
                self.disk_nodes.pop(n.key, None)
                self.disk.delete(n.key)
                self.index.set_disk(n, False)
            self.index.remove(n)
            self.dropped += 1

    def unlock(self, nodes: list[Node]) -> None:
        self.index.unlock(nodes)
        for n in reversed(nodes):  # a load that failed under a lock left a node with no copy
            if n.fastest is None and n.lock_count == 0:
                self.forget(n)

    def restore(self) -> None:
        """Rebuild the index from the disk tier's records (parents first), at start-up."""
        entries = self.disk.scan()
        rank = {e.key: i + 1 for i, e in enumerate(sorted(entries, key=lambda e: e.written_at))}
        for e in entries:
            parent = self.index.root(e.parent) if e.depth == 0 else self.disk_nodes[e.parent]
            node = self.index.insert(parent, e.key, e.token_bytes, e.priority, last_access=rank[e.key])
            self.index.set_disk(node, True)
            self.disk_nodes[e.key] = node
        if entries:
            log.info("disk tier %s: %d cached blocks restored", self.disk.path, len(entries))


    def persist(self) -> int:
        """Queue every cached block not yet on disk for writing, shallowest first (a record
        whose parent is not on disk is useless after a restart), until the tier is full.
        For a graceful shutdown: blocks the caller while GPU blocks are copied to host memory.
        Returns the number of blocks queued; `flush` or `close` writes them."""
        if self.disk is None:
            return 0
        todo = sorted((n for n in self.index.nodes() if not n.on_disk and n.fastest is not None),
                      key=lambda n: (n.depth, -n.priority, -n.last_access))
        self.copier.host_ready()
        written = 0
        for n in todo:
            if not (n.parent.is_root or n.parent.on_disk):
                continue  # its prefix did not fit
            if self.disk.used_bytes + self.disk.value_bytes > self.disk.max_bytes:
                break
            self.disk.make_queue_room(self.disk.value_bytes)   # shutdown may wait; it must not drop
            on_host = n.host_slot is not None
            kv = self.host.tensor[n.host_slot] if on_host else self.gpu.tensor[n.gpu_slot].cpu()
            written += self._write_to_disk(n, kv)
        return written

    def check_integrity(self, owned_gpu: list[int], reserved_host: list[int]) -> None:
        """Every slot is free, held by one node, or in `owned_gpu` / `reserved_host`; the disk
        records are exactly the disk-resident nodes' and within the cap."""
        nodes = list(self.index.nodes())
        _check_slots(self.gpu, [n.gpu_slot for n in nodes if n.gpu_slot is not None], owned_gpu)
        _check_slots(self.host, [n.host_slot for n in nodes if n.host_slot is not None], reserved_host)
        on_disk = {n.key for n in nodes if n.on_disk}
        assert on_disk == set(self.disk_nodes), "disk-resident nodes != disk node map"
        if self.disk is not None:
            self.disk.check_integrity()
            assert set(self.disk.sizes) == on_disk, "disk records != disk-resident nodes"
            assert self.disk.used_bytes <= self.disk.max_bytes, "disk tier over its cap"


def _check_slots(pool: BlockPool, indexed: list[int], other: list[int]) -> None:
    free = pool.free_slots()
    used = indexed + other
    assert len(set(used)) == len(used), f"{pool.tier.name}: a slot is held twice"
    assert not free & set(used), f"{pool.tier.name}: a held slot is on the free list"
    assert len(free) + len(used) == pool.num_blocks, f"{pool.tier.name}: slots leaked"
