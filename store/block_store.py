"""BlockStore: the one owner of KV blocks, their placement across tiers, and sequences' block tables.

    GPU pool ──evict (demote)──► host pool ──evict (write)──► LMDB ──evict──► gone
             ◄─────promote──────           ◄──prefetch (load)─

The engine asks it, by sequence id, for slots (`admit`, `grow`), tells it when blocks are full
(`commit`) and when a sequence ends (`release`). Everything runs on the event loop's thread
except LMDB I/O (the disk tier's thread) and copies (the copier's side stream).

Slot accounting, per pool: every slot is exactly one of
  free | held by an indexed node (cached if the node is unlocked, else locked) |
  owned by a sequence (its uncommitted blocks; locked) | reserved for a load in flight (locked).
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from store.copier import BlockCopier
from store.disk import DiskTier
from store.errors import OutOfBlocks
from store.keys import chain_key, root_key, token_bytes
from store.pool import BlockLayout, BlockPool, Tier
from store.radix import TIERS, Node, RadixIndex
from store.stats import StoreStats, TierCounters, TierStats

log = logging.getLogger("kvgate.store")


@dataclass(frozen=True)
class StoreConfig:
    """Sizes of the tiers. `disk_path` empty = no disk tier."""
    block_size: int = 16
    gpu_blocks: int = 256
    host_blocks: int = 0
    disk_path: str = ""
    disk_max_bytes: int = 0
    staging_bytes: int = 64 << 20  # GPU staging buffer for copies to/from scattered GPU slots

    def __post_init__(self) -> None:
        for name in ("block_size", "gpu_blocks", "staging_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"store.{name} must be >= 1, got {getattr(self, name)}")
        if self.host_blocks < 0:
            raise ValueError(f"store.host_blocks must be >= 0, got {self.host_blocks}")
        if self.disk_path and self.disk_max_bytes <= 0:
            raise ValueError("store.disk_max_bytes must be > 0 when store.disk_path is set")


@dataclass(frozen=True)
class PrefixMatch:
    """The longest cached prefix of a token list, and the tier of each block's fastest copy."""
    root: bytes
    nodes: tuple[Node, ...]
    tiers: tuple[Tier, ...]
    block_size: int

    @property
    def num_tokens(self) -> int:
        return len(self.nodes) * self.block_size

    def tokens_in(self, tier: Tier) -> int:
        return sum(t is tier for t in self.tiers) * self.block_size


@dataclass
class SeqBlocks:
    """One running sequence's blocks. Owned by the store; the engine reads `slots`."""
    seq_id: Hashable
    root: bytes
    priority: int
    slots: list[int]               # block table: GPU slot of block i, i = 0 .. len-1
    path: list[Node]               # locked index nodes of blocks 0 .. len(path)-1
    owned: set[int]                # GPU slots freed at release: blocks not (or not first) indexed
    cached_tokens: dict[Tier, int] # prompt tokens found in each tier at admission
    cacheable: bool = True         # False after a key collision: later blocks are not indexed

    @property
    def num_cached_tokens(self) -> int:
        return sum(self.cached_tokens.values())


@dataclass
class _Load:
    """A disk -> host load in flight: its path stays locked and its host slots reserved."""
    path: list[Node]               # the matched prefix up to the last block loaded
    nodes: list[Node]              # the blocks being loaded, one per slot
    slots: list[int]
    task: asyncio.Task | None = field(default=None, repr=False)


class BlockStore:
    def __init__(self, config: StoreConfig, layout: BlockLayout, fingerprint: str,
                 device: str | torch.device | None = None,
                 compute_stream: torch.cuda.Stream | None = None) -> None:
        if layout.block_size != config.block_size:
            raise ValueError(f"layout block_size {layout.block_size} != store.block_size {config.block_size}")
        self.config = config
        self.layout = layout
        self.fingerprint = fingerprint
        self.block_size = config.block_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        pin = self.device.type == "cuda"
        self.gpu = BlockPool(Tier.GPU, layout, config.gpu_blocks, self.device)
        self.host = BlockPool(Tier.HOST, layout, config.host_blocks, "cpu", pin_memory=pin)
        self.copier = BlockCopier(self.gpu, self.host, config.staging_bytes, compute_stream)
        self.index = RadixIndex()
        self.counters = {t: TierCounters() for t in TIERS}
        self.misses = 0                    # prompt blocks not found in any tier at admission
        self.dropped = 0                   # blocks that left the index (no tier would keep them)
        self._seqs: dict[Hashable, SeqBlocks] = {}
        self._loads: dict[Node, _Load] = {}
        self._disk_nodes: dict[bytes, Node] = {}  # key -> the node whose record is on disk
        self.disk: DiskTier | None = None
        if config.disk_path:
            self.disk = DiskTier(config.disk_path, fingerprint, layout, config.disk_max_bytes,
                                 on_lost=self._on_disk_lost)
            self._restore_from_disk()

    # ---- lookup -----------------------------------------------------------------------------

    def root_key(self, namespace: str = "") -> bytes:
        return root_key(self.fingerprint, namespace)

    def match(self, root: bytes, token_ids: Sequence[int], max_tokens: int | None = None) -> PrefixMatch:
        """Longest cached prefix of `token_ids` (at most `max_tokens`), in any tier."""
        limit = len(token_ids) if max_tokens is None else min(max_tokens, len(token_ids))
        nodes = self.index.match(root, token_bytes(token_ids[:limit]), self.block_size,
                                 limit // self.block_size)
        return PrefixMatch(root, tuple(nodes), tuple(n.fastest for n in nodes), self.block_size)

    async def prefetch(self, match: PrefixMatch) -> int:
        """Load the disk-only blocks of `match` into the host tier, so that `admit` finds them
        there. Returns how many blocks this call loaded. Cancelling the caller does not cancel
        the load (its slots are written by another thread until it completes)."""
        while True:
            path = _live_prefix(match.nodes)
            busy = {self._loads[n].task for n in path if n in self._loads}
            if not busy:
                break
            await asyncio.wait(busy)
        todo = [n for n in path if n.fastest is Tier.DISK]  # a suffix: parents are never slower
        if not todo or self.disk is None:
            return 0
        self.index.lock(path)  # before reserving host slots, which may evict host blocks
        slots = self._reserve_host(len(todo))
        if not slots:
            self._unlock(path)
            return 0
        load = _Load(path, todo[:len(slots)], slots)
        for n in load.nodes:
            self._loads[n] = load
        load.task = asyncio.get_running_loop().create_task(self._run_load(load))
        return await asyncio.shield(load.task)

    async def _run_load(self, load: _Load) -> int:
        def sink(i: int, payload: memoryview) -> None:  # on the disk tier's thread
            if i == 0:
                self.copier.host_ready()
            self.host.tensor[load.slots[i]].view(torch.uint8).numpy().reshape(-1)[:] = payload
        ok: list[bool] | None = None
        try:
            ok = await self.disk.load([(n.key, n.parent.key, n.token_bytes) for n in load.nodes], sink)
        finally:
            for n in load.nodes:
                del self._loads[n]
            for i, (n, slot) in enumerate(zip(load.nodes, load.slots)):
                if ok is not None and ok[i]:
                    self.index.set_host(n, slot)
                else:
                    self.host.free([slot])
                    if ok is not None:  # missing or corrupt record (already deleted)
                        self._lose_disk_copy(n)
            self._unlock(load.path)
        loaded = sum(n.host_slot is not None and _live_prefix([n]) == [n] for n in load.nodes)
        self.counters[Tier.DISK].promotions += loaded
        return loaded

    # ---- sequences --------------------------------------------------------------------------

    def admit(self, seq_id: Hashable, root: bytes, token_ids: Sequence[int], priority: int = 0,
              max_cached_tokens: int | None = None) -> SeqBlocks:
        """Start a sequence: reuse its cached prefix (at most `max_cached_tokens`; blocks still on
        disk only are not used: `prefetch` first), promote host blocks, and allocate GPU slots
        for all of `token_ids`. All or nothing: raises OutOfBlocks and changes nothing."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} is already admitted")
        if not token_ids:
            raise ValueError("a sequence needs at least one token")
        match = self.match(root, token_ids, max_cached_tokens)
        nodes = [n for n in match.nodes if n.fastest <= Tier.HOST]
        tiers = match.tiers[:len(nodes)]
        self.index.lock(nodes)
        promote = [n for n in nodes if n.gpu_slot is None]
        try:
            slots = self._allocate_gpu(len(promote) + self._blocks_for(len(token_ids)) - len(nodes))
        except OutOfBlocks:
            self._unlock(nodes)
            raise
        self.copier.to_gpu([n.host_slot for n in promote], slots[:len(promote)])
        for n, slot in zip(promote, slots):
            self.index.set_gpu(n, slot)
        self.index.raise_priority(nodes, priority)
        self.counters[Tier.HOST].promotions += len(promote)
        for t in tiers:
            self.counters[t].hits += 1
        self.misses += len(token_ids) // self.block_size - len(nodes)
        owned = slots[len(promote):]
        seq = SeqBlocks(seq_id, root, priority, [n.gpu_slot for n in nodes] + owned, nodes,
                        set(owned), {t: match.block_size * sum(x is t for x in tiers) for t in TIERS})
        self._seqs[seq_id] = seq
        return seq

    def grow(self, seq_id: Hashable, num_tokens: int) -> list[int]:
        """Make the block table of `seq_id` cover `num_tokens`; returns the new slots.
        Raises OutOfBlocks and changes nothing if the GPU pool cannot supply them."""
        seq = self._seqs[seq_id]
        slots = self._allocate_gpu(max(0, self._blocks_for(num_tokens) - len(seq.slots)))
        seq.slots += slots
        seq.owned.update(slots)
        return slots

    def commit(self, seq_id: Hashable, token_ids: Sequence[int], num_computed_tokens: int | None = None) -> int:
        """Index the full blocks among the first `num_computed_tokens` of `token_ids` (whose KV
        is written) that are not indexed yet; returns how many. A block whose key is already
        indexed with the same tokens joins that node (the sequence keeps its own copy); one
        whose key is taken by other tokens (a hash collision) stops indexing for the sequence."""
        seq = self._seqs[seq_id]
        n = len(token_ids) if num_computed_tokens is None else num_computed_tokens
        full = min(n // self.block_size, len(seq.slots))
        before = len(seq.path)
        while seq.cacheable and len(seq.path) < full:
            parent = seq.path[-1] if seq.path else self.index.root(seq.root)
            i = len(seq.path)
            block = token_bytes(token_ids[i * self.block_size:(i + 1) * self.block_size])
            key = chain_key(parent.key, block)
            node = parent.children.get(key)
            slot = seq.slots[i]
            if node is None:
                node = self.index.insert(parent, key, block, seq.priority)
                self.index.set_gpu(node, slot)
                seq.owned.discard(slot)
            elif node.token_bytes != block:
                log.warning("block key collision under %s; not indexing the rest", parent.key.hex())
                seq.cacheable = False
                break
            elif node.gpu_slot is None:   # cached but not on the GPU: adopt our copy
                self.index.set_gpu(node, slot)
                seq.owned.discard(slot)
            self.index.lock([node])
            self.index.raise_priority([node], seq.priority)
            seq.path.append(node)
        return len(seq.path) - before

    def release(self, seq_id: Hashable) -> None:
        """End a sequence (finished, aborted, failed): its indexed blocks stay cached."""
        seq = self._seqs.pop(seq_id)
        self._unlock(seq.path)
        self.gpu.free(sorted(seq.owned))

    def block_table(self, seq_id: Hashable) -> list[int]:
        return self._seqs[seq_id].slots

    @property
    def num_sequences(self) -> int:
        return len(self._seqs)

    # ---- allocation and eviction ------------------------------------------------------------

    def _blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def _allocate_gpu(self, n: int) -> list[int]:
        """`n` GPU slots, evicting cached blocks (leaf-first, by priority then LRU) if needed."""
        available = self.gpu.num_free + self.index.num_cached[Tier.GPU]
        if n > available:
            raise OutOfBlocks(f"need {n} GPU blocks, {self.gpu.num_free} free and "
                              f"{self.index.num_cached[Tier.GPU]} evictable of {self.gpu.num_blocks}")
        if n > self.gpu.num_free:
            self._evict_gpu(n - self.gpu.num_free)
        return self.gpu.allocate(n)

    def _evict_gpu(self, n: int) -> None:
        """Demote `n` GPU blocks to the host tier in one batched copy (or drop them if the host
        tier has no room: the copy was only a cache)."""
        victims = self.index.select_victims(Tier.GPU, n)
        # parents first: if the host tier has too little room, the deepest blocks miss out,
        # so a parent is never slower than its child
        need_host = sorted((v for v in victims if v.host_slot is None), key=lambda v: v.depth)
        # the victims' own host copies must survive making room for the others
        host_slots = self._reserve_host(len(need_host), keep=set(victims))
        moved = need_host[:len(host_slots)]
        self.copier.to_host([v.gpu_slot for v in moved], host_slots)
        for v, slot in zip(moved, host_slots):
            self.index.set_host(v, slot)
        freed = [v.gpu_slot for v in victims]
        for v in victims:
            self.index.set_gpu(v, None)
        self.gpu.free(freed)
        self.counters[Tier.GPU].evictions += len(victims)
        for v in reversed(need_host[len(host_slots):]):  # no room on the host for these
            if v.fastest is None:
                self._forget(v)
            else:  # only on disk now: no descendant may stay faster than it
                self._demote_from_host([d for d in self.index.subtree(v)
                                        if d is not v and d.host_slot is not None])

    def _reserve_host(self, n: int, keep: set[Node] | frozenset = frozenset()) -> list[int]:
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
                self._forget(v)

    def _write_to_disk(self, node: Node, kv: torch.Tensor) -> bool:
        """Queue `node`'s record (`kv` is its block, in host memory) if the tier has room."""
        disk = self.disk
        if node.key in self._disk_nodes:  # another node under a colliding key holds the record
            return False
        value = disk.encode(node.parent.key, node.token_bytes, node.depth, node.priority, kv)
        if disk.used_bytes + len(value) > disk.max_bytes or not disk.put(node.key, value):
            return False
        self.index.set_disk(node, True)
        self._disk_nodes[node.key] = node
        return True

    def _make_disk_room(self, nbytes: int, keep: set[Node]) -> None:
        excess = self.disk.used_bytes + nbytes - self.disk.max_bytes
        if excess <= 0:
            return
        victims = self.index.select_victims(Tier.DISK, math.ceil(excess / self.disk.value_bytes), keep)
        for v in victims:
            self._lose_disk_copy(v)
        self.counters[Tier.DISK].evictions += len(victims)

    def _lose_disk_copy(self, node: Node) -> None:
        """The node's disk record is gone (evicted, corrupt, failed to write): update the index,
        and drop the node if that was its last copy and nobody holds it."""
        if self._disk_nodes.get(node.key) is node:
            del self._disk_nodes[node.key]
            self.disk.delete(node.key)
        if node.on_disk:
            self.index.set_disk(node, False)
        if node.fastest is None and node.lock_count == 0 and node.parent is not None:
            self._forget(node)

    def _on_disk_lost(self, keys: list[bytes]) -> None:
        for key in keys:
            node = self._disk_nodes.get(key)
            if node is not None:
                self._lose_disk_copy(node)

    def _forget(self, node: Node) -> None:
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
                self._disk_nodes.pop(n.key, None)
                self.disk.delete(n.key)
                self.index.set_disk(n, False)
            self.index.remove(n)
            self.dropped += 1

    def _unlock(self, nodes: list[Node]) -> None:
        self.index.unlock(nodes)
        for n in reversed(nodes):  # a load that failed under a lock left a node with no copy
            if n.fastest is None and n.lock_count == 0:
                self._forget(n)

    # ---- restart ----------------------------------------------------------------------------

    def _restore_from_disk(self) -> None:
        """Rebuild the index from the disk tier's records (parents first)."""
        entries = self.disk.scan()
        rank = {e.key: i + 1 for i, e in enumerate(sorted(entries, key=lambda e: e.written_at))}
        for e in entries:
            parent = self.index.root(e.parent) if e.depth == 0 else self._disk_nodes[e.parent]
            node = self.index.insert(parent, e.key, e.token_bytes, e.priority, last_access=rank[e.key])
            self.index.set_disk(node, True)
            self._disk_nodes[e.key] = node
        if entries:
            log.info("disk tier %s: %d cached blocks restored", self.disk.path, len(entries))

    # ---- lifecycle, stats, invariants ---------------------------------------------------------

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
            kv = self.host.tensor[n.host_slot] if n.host_slot is not None else self.gpu.tensor[n.gpu_slot].cpu()
            written += self._write_to_disk(n, kv)
        return written

    async def flush(self) -> None:
        """Wait until every queued disk write has reached LMDB."""
        if self.disk is not None:
            await self.disk.flush()

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()

    def stats(self) -> StoreStats:
        loading = sum(len(ld.slots) for ld in {id(ld): ld for ld in self._loads.values()}.values())
        owned = sum(len(s.owned) for s in self._seqs.values())
        disk = self.disk
        disk_capacity = disk.max_bytes // disk.value_bytes if disk else 0
        tiers = {}
        for t, pool_free, capacity, extra in (
                (Tier.GPU, self.gpu.num_free, self.gpu.num_blocks, owned),
                (Tier.HOST, self.host.num_free, self.host.num_blocks, loading),
                (Tier.DISK, disk_capacity - len(disk.sizes) if disk else 0, disk_capacity, 0)):
            c = self.counters[t]
            tiers[t] = TierStats(capacity=capacity, free=pool_free, cached=self.index.num_cached[t],
                                 locked=self.index.num_locked[t] + extra, hits=c.hits,
                                 evictions=c.evictions, promotions=c.promotions)
        return StoreStats(tiers=tiers, misses=self.misses, dropped=self.dropped,
                          disk_bytes=disk.used_bytes if disk else 0,
                          disk=dataclasses.replace(disk.counters) if disk else None)

    def check_integrity(self) -> None:
        """Assert every invariant of the index, pools, sequences and disk accounting."""
        self.index.check_integrity()
        stats = self.stats()
        for t in (Tier.GPU, Tier.HOST):
            s = stats.tiers[t]
            assert s.free + s.cached + s.locked == s.capacity, f"{t.name}: {s}"
        loads = {id(ld): ld for ld in self._loads.values()}.values()
        expected_locks = collections.Counter(n for s in self._seqs.values() for n in s.path)
        for ld in loads:
            expected_locks.update(ld.path)
        _check_slots(self.gpu, [n.gpu_slot for n in self.index.nodes() if n.gpu_slot is not None],
                     [s for seq in self._seqs.values() for s in seq.owned])
        _check_slots(self.host, [n.host_slot for n in self.index.nodes() if n.host_slot is not None],
                     [s for ld in loads for s in ld.slots])
        for seq in self._seqs.values():
            for i, slot in enumerate(seq.slots):
                assert slot in seq.owned or (i < len(seq.path) and seq.path[i].gpu_slot == slot), \
                    f"{seq.seq_id}: block {i} slot {slot} is neither owned nor its node's"
            for n in seq.path:
                assert n.lock_count > 0 and n.gpu_slot is not None, f"{seq.seq_id}: {n}"
        for n in self.index.nodes():
            assert n.lock_count == expected_locks[n], f"{n}: locked {n.lock_count}, {expected_locks[n]} holders"
        on_disk = {n.key for n in self.index.nodes() if n.on_disk}
        assert on_disk == set(self._disk_nodes), "disk-resident nodes != disk node map"
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


def _live_prefix(nodes: Sequence[Node]) -> list[Node]:
    """The leading nodes of a (possibly stale) match that are still indexed and have a copy."""
    live = []
    for n in nodes:
        if n.fastest is None or n.parent.children.get(n.key) is not n:
            break
        live.append(n)
    return live
