"""BlockStore: the one owner of KV blocks and of sequences' block tables.

The engine asks it, by sequence id, for slots (`admit`, `grow`), tells it when blocks are full
(`commit`) and when a sequence ends (`release`). Everything runs on the event loop's thread
except LMDB I/O (the disk tier's thread) and copies (the copier's side stream). Where blocks
live and how they move between tiers is `Placement`'s job (store/placement.py).

Slot accounting, per pool: every slot is exactly one of
  free | held by an indexed node (locked if it is a locked node's fastest copy, else cached) |
  owned by a sequence (its uncommitted blocks; locked) |
  reserved for a disk load in flight (locked).
The disk tier's staging slots are its own: reads of sequences' loads, and spilled GPU blocks
waiting to be written.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from store.config import StoreConfig, disk_staging_blocks
from store.copier import BlockCopier
from store.disk import DiskTier
from store.errors import OutOfBlocks
from store.keys import BlockKeys, PublicPrefixes, Scope, root_key, token_bytes
from store.loader import DiskLoader
from store.placement import Placement
from store.pool import BlockLayout, BlockPool, Tier
from store.radix import TIERS, Changes, Node, RadixIndex
from store.stats import StoreStats, TierStats

log = logging.getLogger("kvgate.store")
PUBLIC_MAX_SHARE = 0.25      # of the GPU pool: the most blocks all public prefixes together may have


MAX_NAMES = 65_536


@dataclass(frozen=True)
class PrefixMatch:
    """The longest cached prefix of a token list, and the tier of each block's fastest copy."""
    keys: BlockKeys                # the token list's keys (in its scope)
    nodes: tuple[Node, ...]
    tiers: tuple[Tier, ...]


@dataclass(frozen=True)
class LoadStep:
    """Where a sequence's load stands (`BlockStore.advance_load`)."""
    meet: int                      # the token where the front is to meet the read (its first block's)
    end: int                       # the end of its disk part (a block)
    filled: int                    # blocks the computed front just skipped: they were read (the load ended)
    compute_until: int | None      # the front may compute up to this token (the loaded part's start)
    reading_done: bool             # no more blocks will be read


@dataclass
class SeqBlocks:
    """One running sequence's blocks. Owned by the store; the engine reads `slots`."""
    seq_id: Hashable
    keys: BlockKeys                # its token list's block keys, in its scope
    priority: int
    slots: list[int]               # block table: GPU slot of block i, i = 0 .. len-1
    path: list[Node]               # locked index nodes of blocks 0 .. len(path)-1
    owned: set[int]                # GPU slots freed at release: blocks not (or not first) indexed
    tiers: tuple[Tier, ...]        # tier each cached block was found in at admission
    block_size: int
    cacheable: bool = True         # False after a key collision: later blocks are not indexed
    retention: tuple[int, int, int, float] | None = None   # (first block, end block, priority, seconds)

    @property
    def cached_tokens(self) -> dict[Tier, int]:
        """Prompt tokens found in each tier at admission (blocks a sequence's load read from
        disk are not among them: `advance_load` says how many it filled)."""
        return {t: self.block_size * sum(x is t for x in self.tiers) for t in TIERS}

    @property
    def num_cached_tokens(self) -> int:
        return len(self.tiers) * self.block_size


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
        self.gpu = BlockPool(Tier.GPU, layout, config.gpu_blocks, self.device, scratch=True)
        # with a disk tier, the host pool is shared memory: the disk writer process encodes from it
        self.host = BlockPool(Tier.HOST, layout, config.host_blocks, "cpu", pin_memory=pin,
                              shared=bool(config.disk_path))
        self.copier = BlockCopier(self.gpu, self.host, config.staging_bytes, compute_stream)
        self.index = RadixIndex()
        self.disk = None
        if config.disk_path:
            self.disk = DiskTier(config.disk_path, fingerprint, layout, config.disk_max_bytes,
                                 payload_ready=self.copier.host_ready,
                                 staging_blocks=disk_staging_blocks(config, layout), pin_memory=pin,
                                 shared_pools=(self.host,))
        self.placement = Placement(self.index, self.gpu, self.host, self.copier, self.disk, config.write_policy)
        self.loader = DiskLoader(self.index, self.placement, layout.block_bytes, self.disk)
        self.misses = 0                    # prompt blocks not found in any tier at admission
        self.public = PublicPrefixes(fingerprint)
        self._names: dict[bytes, str] = {}  # root key -> namespace, of the latest MAX_NAMES (KV events)
        self._seqs: dict[Hashable, SeqBlocks] = {}
        if self.disk is not None:
            self.placement.restore()

    # ---- lookup -----------------------------------------------------------------------------

    def first_miss(self, token_ids: Sequence[int], match: PrefixMatch, max_blocks: int) -> dict | None:
        """The first of the first `max_blocks` blocks of `token_ids` that `match` did not find,
        and why: "evicted" (from which tier, when, why: the store keeps the latest dropped keys)
        or "never_computed" (in this namespace and model, as far as the store remembers)."""
        i = len(match.nodes)
        if i >= max_blocks:
            return None
        key = match.keys.upto(token_ids, i + 1)[i]
        dropped = self.placement.dropped_keys.get(key)
        if dropped is None:
            return {"block": i, "reason": "never_computed"}
        tier, at, why = dropped
        return {"block": i, "reason": "evicted", "tier": tier, "at": round(at, 3), "policy": why}

    def evict_prefix(self, scope: BlockKeys | Scope | bytes, token_ids: Sequence[int]) -> int:
        """Drop the cached blocks of `token_ids` (and every block that follows them) from every
        tier, from the first of the scope's own namespace (never a public prefix's blocks but
        through the public root's scope) whose blocks no running sequence holds; returns how
        many went."""
        keys = self._keys(scope)
        for node in self.match(keys, token_ids).nodes:
            subtree = self.index.subtree(node)
            if node.namespace == keys.scope.root and not any(n.lock_count for n in subtree):
                held = [t for t in TIERS if node.has(t)]   # its copies all go now: name the slowest
                self.placement.forget(node, held[-1] if held else None, "evicted through the admin API")
                return len(subtree)
        return 0

    def blocks_by_namespace(self) -> dict[bytes, dict[Tier, int]]:
        """Cached blocks per namespace (root key) and tier: counts only, no token contents."""
        counts: dict[bytes, dict[Tier, int]] = {}
        for n in self.index.nodes():
            tiers = counts.setdefault(n.namespace, {t: 0 for t in TIERS})
            for t in TIERS:
                tiers[t] += n.has(t)
        return counts

    def cap_gpu_share(self, shares: dict[str, float]) -> None:
        """Namespaces whose cached blocks may hold at most this share of the GPU pool: above it,
        theirs are evicted first (a tenant's `max_kv_share`)."""
        self.placement.gpu_caps = {self.root_key(ns): int(share * self.gpu.num_blocks)
                                   for ns, share in shares.items() if share < 1}

    def root_key(self, namespace: str = "") -> bytes:
        return root_key(self.fingerprint, namespace)

    def record_changes(self) -> Changes:
        """From now on, queue every copy that appears in a tier or leaves it (the KV events
        drain the queue); the store owns it. `stop_recording` ends it."""
        self.index.changes = Changes()
        return self.index.changes

    def stop_recording(self) -> None:
        self.index.changes = None

    # ---- public prefixes ----------------------------------------------------------------------

    @property
    def public_root(self) -> bytes:
        return self.public.root

    def declare_public(self, token_ids: Sequence[int]) -> int:
        """Make the full blocks of `token_ids`, and so every prompt's leading blocks equal to
        them, shared by every namespace (`scope`); returns how many blocks that is. Public
        blocks are bounded (PUBLIC_MAX_SHARE of the GPU pool, PublicPrefixesFull past it): they
        are hit by everyone, so recency alone would let them crowd out every tenant's cache."""
        return self.public.declare(token_bytes(token_ids), self.block_size,
                                   max(1, int(PUBLIC_MAX_SHARE * self.gpu.num_blocks)))

    def keys(self, namespace: str, token_ids: Sequence[int]) -> BlockKeys:
        """The block keys of a prompt of `namespace` (a request computes them once and carries
        them): its leading blocks that a declared public prefix has are shared, the rest are the
        namespace's."""
        root = self.root_key(namespace)
        if namespace and root not in self._names:
            if len(self._names) >= MAX_NAMES:        # clients may name many (cache_salt)
                del self._names[next(iter(self._names))]
            self._names[root] = namespace
        return self.public.keys(root, token_ids, self.block_size)

    def scope(self, namespace: str, token_ids: Sequence[int]) -> Scope:
        """Where the blocks of a prompt of `namespace` are cached (`keys`' scope)."""
        return self.keys(namespace, token_ids).scope

    def namespace_name(self, root: bytes) -> str:
        """The namespace whose root key is `root`, if a request of it came lately ("" if not)."""
        return self._names.get(root, "")

    def match(self, keys: BlockKeys | Scope | bytes, token_ids: Sequence[int],
              max_tokens: int | None = None) -> PrefixMatch:
        """Longest cached prefix of `token_ids` (at most `max_tokens`), in any tier. `keys`: the
        token list's (`keys`), or a scope (`scope`; a namespace's root key stands for its scope
        without public prefixes), whose keys are then computed for this match alone."""
        keys = self._keys(keys)
        limit = len(token_ids) if max_tokens is None else min(max_tokens, len(token_ids))
        nodes = self.index.match(keys.scope.first, keys.upto(token_ids, limit // self.block_size),
                                 token_bytes(token_ids[:limit]), self.block_size)
        return PrefixMatch(keys, tuple(nodes), tuple(n.fastest for n in nodes))

    def _keys(self, keys: BlockKeys | Scope | bytes) -> BlockKeys:
        if isinstance(keys, BlockKeys):
            return keys
        return BlockKeys(keys if isinstance(keys, Scope) else Scope(keys), self.block_size)

    # ---- compute and load at once (see store/loader.py) --------------------------------------

    def start_load(self, seq_id: Hashable, match: PrefixMatch, stop: int = 0,
                   on_progress: Callable[[], None] = lambda: None) -> int:
        """Start reading the disk-only blocks of `match` (the cached prefix of sequence `seq_id`'s
        prompt) from the back down to block `stop`, while the sequence computes from the front
        (`advance_load`); `on_progress` is called on the event loop as blocks arrive and when
        the load ends. Returns the blocks to read."""
        load = self.loader.start(seq_id, list(match.nodes), self.disk_part(match)[0], stop, on_progress)
        return load.to_read if load else 0

    def disk_part(self, match: PrefixMatch) -> tuple[int, int]:
        """(first, end): the blocks of `match` whose fastest copy is on disk."""
        first = next((i for i, t in enumerate(match.tiers) if t is Tier.DISK), len(match.tiers))
        return first, len(match.tiers)

    def advance_load(self, seq_id: Hashable, num_computed: int) -> LoadStep | None:
        """For an admitted sequence with a load: copy the blocks read so far into its GPU slots
        (those its computed front, `num_computed` tokens, has not reached), and once the front
        has reached them, end the load: the sequence may skip them. None if it has no load."""
        front = num_computed // self.block_size
        load = self.loader.progress(seq_id, front)
        if load is None:
            return None
        meet, end = load.stop * self.block_size, load.end
        arrived = self.loader.unstage(seq_id)
        if arrived:
            slots = self._seqs[seq_id].slots
            self.copier.to_gpu([s for _, s in arrived], [slots[b] for b, _ in arrived], self.disk.staging)
            self.loader.free_staging([s for _, s in arrived])   # later reads into them wait for the copy
        if load.loaded_from <= front < end:          # the front reached the blocks read: skip them
            self.loader.drop(seq_id)
            self.placement.count_promotions(Tier.DISK, end - front)
            return LoadStep(meet, end, end - front, None, True)
        if front >= end or load.done and load.loaded_from >= end:   # computed past it, or read nothing
            self.loader.drop(seq_id)
            return LoadStep(meet, end, 0, None, True)
        return LoadStep(meet, end, 0, load.loaded_from * self.block_size, load.done)

    def disk_read_queue(self) -> tuple[int, bool]:
        """(bytes the sequences' loads still mean to read, whether a read has stalled)."""
        return self.loader.queued_bytes(), self.loader.stalled()

    def drop_load(self, seq_id: Hashable) -> None:
        self.loader.drop(seq_id)

    async def measure_disk_read(self) -> float | None:
        return await self.loader.measure()

    @property
    def disk_read_rate(self) -> float | None:
        """Bytes/s of disk -> host loads (a moving average; None until measured)."""
        return self.loader.read_rate

    @disk_read_rate.setter
    def disk_read_rate(self, value: float | None) -> None:
        self.loader.read_rate = value

    # ---- sequences --------------------------------------------------------------------------

    def admit(self, seq_id: Hashable, keys: BlockKeys | Scope | bytes, token_ids: Sequence[int], priority: int = 0,
              max_cached_tokens: int | None = None, max_tier: Tier = Tier.HOST,
              retention: tuple[int, int, int, float] | None = None) -> SeqBlocks:
        """Start a sequence: reuse its cached prefix (at most `max_cached_tokens`, up to its
        first block in a tier slower than `max_tier`; blocks still on disk only are never used:
        a sequence's load reads them, `start_load`), promote host blocks, and allocate GPU slots for all of `token_ids`.
        All or nothing: raises OutOfBlocks and changes nothing."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} is already admitted")
        if not token_ids:
            raise ValueError("a sequence needs at least one token")
        if not -2**63 <= priority < 2**63:     # the disk tier's records store it in 64 bits
            raise ValueError(f"priority {priority} does not fit in 64 bits")
        match = self.match(keys, token_ids, max_cached_tokens)
        # a prefix of the match: a parent is never in a slower tier than its child
        nodes = [n for n in match.nodes if n.fastest <= min(max_tier, Tier.HOST)]
        tiers = match.tiers[:len(nodes)]
        self.placement.lock(nodes)
        promote = [n for n in nodes if n.gpu_slot is None]
        try:
            need = len(promote) + self._blocks_for(len(token_ids)) - len(nodes)
            slots = self.placement.allocate_gpu(need)
        except OutOfBlocks:
            self.placement.unlock(nodes)
            raise
        self.placement.promote(promote, slots[:len(promote)])
        self.index.use(nodes, priority)
        self.placement.count_hits(tiers)
        self.misses += len(token_ids) // self.block_size - len(nodes)
        owned = slots[len(promote):]
        seq = SeqBlocks(seq_id, match.keys, priority, [n.gpu_slot for n in nodes] + owned, nodes, set(owned),
                        tiers, self.block_size, retention=retention)
        self._retain(seq, 0, nodes)
        self._seqs[seq_id] = seq
        return seq

    def grow(self, seq_id: Hashable, num_tokens: int) -> list[int]:
        """Make the block table of `seq_id` cover `num_tokens`; returns the new slots.
        Raises OutOfBlocks and changes nothing if the GPU pool cannot supply them."""
        seq = self._seqs[seq_id]
        slots = self.placement.allocate_gpu(max(0, self._blocks_for(num_tokens) - len(seq.slots)))
        seq.slots += slots
        seq.owned.update(slots)
        return slots

    def commit(self, seq_id: Hashable, token_ids: Sequence[int],
               num_computed_tokens: int | None = None) -> int:
        """Index the full blocks among the first `num_computed_tokens` of `token_ids` (whose KV
        is written) that are not indexed yet; returns how many. A block whose key is already
        indexed with the same tokens joins that node (the sequence keeps its own copy); one
        whose key is taken by other tokens (a hash collision) stops indexing for the sequence."""
        seq = self._seqs[seq_id]
        n = len(token_ids) if num_computed_tokens is None else num_computed_tokens
        full = min(n // self.block_size, len(seq.slots))
        before = len(seq.path)
        if not seq.cacheable or before >= full:
            return 0
        keys = seq.keys.upto(token_ids, full)
        while seq.cacheable and len(seq.path) < full:
            parent = seq.path[-1] if seq.path else self.index.root(seq.keys.scope.first)
            i = len(seq.path)
            block = token_bytes(token_ids[i * self.block_size:(i + 1) * self.block_size])
            key = keys[i]
            node = parent.children.get(key)
            slot = seq.slots[i]
            if node is None:
                node = self.index.insert(parent, key, block, seq.priority, namespace=seq.keys.scope.namespace(i))
                self.index.set_gpu(node, slot)
                seq.owned.discard(slot)
            elif node.token_bytes != block:
                log.warning("block key collision under %s; not indexing the rest", parent.key.hex())
                seq.cacheable = False
                break
            elif node.gpu_slot is None:   # cached but not on the GPU: adopt our copy
                self.index.set_gpu(node, slot)
                seq.owned.discard(slot)
            self.placement.lock([node])
            self.index.use([node], seq.priority)
            self._retain(seq, len(seq.path), [node])
            seq.path.append(node)
        return len(seq.path) - before

    def _retain(self, seq: SeqBlocks, first: int, nodes: list[Node]) -> None:
        """Give `nodes` (blocks first, first+1, ... of `seq`) the retention `seq` asked for, if
        they fall in its range (`admit`'s `retention`: first block, end block, priority, seconds)."""
        if seq.retention is None:
            return
        start, end, priority, seconds = seq.retention
        held = [n for i, n in enumerate(nodes, first) if start <= i < end]
        if held:
            self.index.retain(held, priority, self.index.clock() + seconds)

    def release(self, seq_id: Hashable) -> None:
        """End a sequence (finished, aborted, failed, or preempted): its indexed blocks stay
        cached, to be evicted like any others."""
        seq = self._seqs.pop(seq_id)
        self.loader.drop(seq_id)
        self.placement.unlock(seq.path)
        self.gpu.free(sorted(seq.owned))

    def num_indexed(self, seq_id: Hashable) -> int:
        """The blocks of `seq_id`, from its first, that are indexed: found by other requests."""
        return len(self._seqs[seq_id].path)

    def sequence_ids(self) -> set[Hashable]:
        """The admitted sequences."""
        return set(self._seqs)

    def load_ids(self) -> set[Hashable]:
        """The sequences with a load in progress (see `start_load`)."""
        return self.loader.sequence_load_ids()

    def block_table(self, seq_id: Hashable) -> list[int]:
        return self._seqs[seq_id].slots

    @property
    def num_sequences(self) -> int:
        return len(self._seqs)

    def _blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    # ---- lifecycle, stats, invariants ---------------------------------------------------------

    def persist(self, deadline: float | None = None) -> tuple[int, int]:
        """Queue every cached block not yet on disk for writing (graceful shutdown), until
        `deadline` (time.monotonic()); see Placement.persist. `flush` or `close` writes them.
        Returns (blocks queued, blocks left for lack of time)."""
        return self.placement.persist(deadline)

    async def flush(self) -> None:
        """Wait until every queued disk write has reached LMDB."""
        if self.disk is not None:
            await self.disk.flush()

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()

    def stats(self) -> StoreStats:
        host_held = len(self.placement.writing_slots)
        owned = sum(len(s.owned) for s in self._seqs.values())
        disk = self.disk
        disk_capacity = disk.max_bytes // disk.value_bytes if disk else 0
        tiers = {}
        for t, pool_free, capacity, extra in (
                (Tier.GPU, self.gpu.num_free, self.gpu.num_blocks, owned),
                (Tier.HOST, self.host.num_free, self.host.num_blocks, host_held),
                (Tier.DISK, disk_capacity - len(disk.sizes) if disk else 0, disk_capacity, 0)):
            c = self.placement.counters[t]
            tiers[t] = TierStats(capacity=capacity, free=pool_free, cached=self.index.num_cached[t],
                                 locked=self.index.num_locked[t] + extra, hits=c.hits,
                                 evictions=c.evictions, promotions=c.promotions)
        return StoreStats(tiers=tiers, misses=self.misses, dropped=self.placement.dropped,
                          disk_bytes=disk.used_bytes if disk else 0,
                          disk=dataclasses.replace(disk.counters) if disk else None,
                          writes_skipped=dict(self.placement.writes_skipped),
                          overload=dict(self.placement.overload))

    def check_integrity(self) -> None:
        """Assert every invariant of the index, pools, sequences and disk accounting."""
        self.index.check_integrity()
        stats = self.stats()
        for t in (Tier.GPU, Tier.HOST):
            s = stats.tiers[t]
            assert s.free + s.cached + s.locked == s.capacity, f"{t.name}: {s}"
        expected_locks = collections.Counter(n for s in self._seqs.values() for n in s.path)
        self.placement.check_integrity([s for seq in self._seqs.values() for s in seq.owned],
                                       self.loader.staging_slots())
        for seq in self._seqs.values():
            for i, slot in enumerate(seq.slots):
                assert slot in seq.owned or (i < len(seq.path) and seq.path[i].gpu_slot == slot), \
                    f"{seq.seq_id}: block {i} slot {slot} is neither owned nor its node's"
            for n in seq.path:
                assert n.lock_count > 0 and n.gpu_slot is not None, f"{seq.seq_id}: {n}"
        for n in self.index.nodes():
            assert n.lock_count == expected_locks[n], f"{n}: {expected_locks[n]} holders"

