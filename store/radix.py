"""Radix index over block keys: which prefixes are cached, where, and what may be evicted.

Every node is one full block. A node's children are keyed by their block key, and a node stores
its own token ids, compared on every match, so a hash collision can never serve another
prefix's KV. There is one tree per root key: one per model fingerprint and cache namespace, and
one for the public prefixes, under whose blocks the namespaces' own continue (store/keys.py).

Placement: a node has a copy in any subset of {GPU, HOST, DISK}; its *fastest* tier is the
lowest-numbered one. Invariants (checked by `check_integrity`):
  - for every tier T, the nodes whose fastest copy is in T or faster form a prefix-closed set:
    a parent is always at least as fast as its child, so a cached prefix has no hole;
  - locks are path-closed: a locked node's parent is locked (sequences lock whole prefixes);
  - a node without any copy exists only while locked (its disk copy failed to load while a
    sequence held it); it matches nothing, and is dropped with its subtree when unlocked.
Eviction is leaf-first: a copy in tier T may go when a faster copy remains (it is redundant), or
when the node is unlocked and no child has a copy in T or faster. A lock pins only the fastest
copy. Order: (priority, last_access) ascending.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence

from store.keys import TOKEN_BYTES
from store.pool import Tier

TIERS = (Tier.GPU, Tier.HOST, Tier.DISK)


class Node:
    """One cached block. Fields are written only by RadixIndex (placement, locks) and read by all."""
    __slots__ = ("key", "token_bytes", "parent", "children", "gpu_slot", "host_slot", "on_disk",
                 "lock_count", "last_access", "priority", "serial", "depth", "uses", "namespace",
                 "retain_priority", "retain_until")

    def __init__(self, key: bytes, token_bytes: bytes, parent: Node | None, priority: int,
                 serial: int, namespace: bytes | None = None) -> None:
        self.key = key
        self.token_bytes = token_bytes   # the block's token ids, uint32 little-endian
        self.parent = parent             # None only for a root
        self.children: dict[bytes, Node] = {}
        self.gpu_slot: int | None = None
        self.host_slot: int | None = None
        self.on_disk = False
        self.lock_count = 0              # sequences (and in-flight loads) holding this block
        self.last_access = 0             # index tick of the last match or commit
        self.priority = priority         # retention priority: higher = kept longer
        self.serial = serial             # creation order; breaks ties in eviction heaps
        self.depth = -1 if parent is None else parent.depth + 1  # block index in the sequence
        self.uses = 0                    # sequences that used it (computed it, or found it cached)
        # the root key of whose cache it is: its tree's (a root is its own), or, from the first
        # block after a public prefix on, the namespace whose request computed it
        self.namespace: bytes = namespace or (key if parent is None else parent.namespace)
        # a retention a request asked for: this priority until the index clock reaches retain_until
        self.retain_priority = priority
        self.retain_until = 0.0

    @property
    def is_root(self) -> bool:
        return self.parent is None

    def has(self, tier: Tier) -> bool:
        if tier is Tier.GPU:
            return self.gpu_slot is not None
        if tier is Tier.HOST:
            return self.host_slot is not None
        return self.on_disk

    @property
    def mixed(self) -> bytes:
        """The namespace mixed into its key (Scope.parent_key): the first block after a public
        prefix has its own; b"" for every other block."""
        return self.namespace if self.parent is not None and self.namespace != self.parent.namespace else b""

    @property
    def fastest(self) -> Tier | None:
        """The fastest tier holding a copy, or None if there is none."""
        if self.gpu_slot is not None:
            return Tier.GPU
        if self.host_slot is not None:
            return Tier.HOST
        return Tier.DISK if self.on_disk else None

    def __repr__(self) -> str:
        where = ",".join(t.name for t in TIERS if self.has(t)) or "-"
        return f"Node({self.key.hex()[:8]} {where} lock={self.lock_count} prio={self.priority})"


class RadixIndex:
    """The tree of cached blocks, with lock counts, placement and evictable-leaf tracking."""

    def __init__(self) -> None:
        self.roots: dict[bytes, Node] = {}
        self._tick = 0
        self._serials = itertools.count()
        self.num_nodes = 0
        # per tier: copies pinned by a lock (locked) and all others (cached)
        self.num_cached = {t: 0 for t in TIERS}
        self.num_locked = {t: 0 for t in TIERS}
        # per tier: nodes whose copy in that tier may be evicted right now
        self.evictable: dict[Tier, set[Node]] = {t: set() for t in TIERS}
        self.gpu_blocks: Counter[bytes] = Counter()    # GPU copies per namespace (root key)
        self.clock: Callable[[], float] = time.monotonic   # retention deadlines (tests set their own)
        # every copy that appears or goes, while someone drains them (the KV events)
        self.changes: Changes | None = None

    # ---- lookup and insertion -------------------------------------------------------------

    def tick(self) -> int:
        self._tick += 1
        return self._tick

    def match(self, root: bytes, keys: Sequence[bytes], tokens: bytes, block_size: int) -> list[Node]:
        """The longest chain of nodes with a copy under root `root` whose keys are `keys` (a
        prefix of them) and whose token ids are those of `tokens` (`token_bytes`, a block of
        `block_size` tokens per key). Touches every matched node (LRU)."""
        node = self.roots.get(root)
        if node is None or not keys:
            return []
        step = block_size * TOKEN_BYTES
        now = self.tick()
        path = []
        for i, key in enumerate(keys):
            child = node.children.get(key)
            if child is None or child.token_bytes != tokens[i * step:(i + 1) * step] or child.fastest is None:
                break
            child.last_access = now
            path.append(child)
            node = child
        return path

    def root(self, root_key: bytes) -> Node:
        node = self.roots.get(root_key)
        if node is None:
            node = self.roots[root_key] = Node(root_key, b"", None, 0, next(self._serials))
        return node

    def insert(self, parent: Node, key: bytes, token_bytes: bytes, priority: int,
               last_access: int | None = None, namespace: bytes | None = None) -> Node:
        """A new node without copies under `parent`; the key must be free under it.
        `last_access` restores an older access order (start-up scan); default: now.
        `namespace`: whose block it is, if not its parent's (after a public prefix)."""
        if key in parent.children:
            raise KeyError(f"block {key.hex()} already indexed")
        node = Node(key, token_bytes, parent, priority, next(self._serials), namespace)
        if last_access is None:
            last_access = self.tick()
        self._tick = max(self._tick, last_access)
        node.last_access = last_access
        parent.children[key] = node
        self.num_nodes += 1
        return node

    def remove(self, node: Node) -> None:
        """Detach a leaf that has no copies and no locks."""
        assert not node.children and node.fastest is None and not node.lock_count, node
        parent = node.parent
        assert parent is not None
        del parent.children[node.key]
        self.num_nodes -= 1
        if parent.is_root and not parent.children:
            del self.roots[parent.key]
        else:
            self._refresh(parent)

    def subtree(self, node: Node) -> list[Node]:
        """`node` and its descendants, children before parents."""
        out, stack = [], [(node, False)]
        while stack:
            n, expanded = stack.pop()
            if expanded:
                out.append(n)
            else:
                stack.append((n, True))
                stack.extend((c, False) for c in n.children.values())
        return out

    def nodes(self) -> Iterator[Node]:
        for root in self.roots.values():
            for n in self.subtree(root):
                if not n.is_root:
                    yield n

    # ---- locks and placement ----------------------------------------------------------------

    def use(self, nodes: list[Node], priority: int) -> None:
        """A sequence of `priority` computed or found `nodes`: count the use, raise the priority."""
        for n in nodes:
            n.uses += 1
            n.priority = max(n.priority, priority)

    def retain(self, nodes: list[Node], priority: int, until: float) -> None:
        """Keep `nodes` at `priority` (if higher than their own) until the clock reaches `until`;
        of several retentions, the highest priority and the latest deadline hold."""
        for n in nodes:
            n.retain_priority = max(n.retain_priority, priority) if n.retain_until > self.clock() else priority
            n.retain_until = max(n.retain_until, until)

    def lock(self, nodes: list[Node]) -> None:
        for n in nodes:
            self._count(n, -1)
            n.lock_count += 1
            self._count(n, +1)
            self._refresh(n)

    def unlock(self, nodes: list[Node]) -> None:
        for n in nodes:
            assert n.lock_count > 0, n
            self._count(n, -1)
            n.lock_count -= 1
            self._count(n, +1)
            self._refresh(n)

    def set_gpu(self, node: Node, slot: int | None) -> None:
        self._set(node, Tier.GPU, slot)

    def set_host(self, node: Node, slot: int | None) -> None:
        self._set(node, Tier.HOST, slot)

    def set_disk(self, node: Node, on_disk: bool) -> None:
        self._set(node, Tier.DISK, on_disk or None)

    def _set(self, node: Node, tier: Tier, value: int | bool | None) -> None:
        had = node.has(tier)
        self._count(node, -1)
        if tier is Tier.GPU:
            self.gpu_blocks[node.namespace] += (value is not None) - (node.gpu_slot is not None)
            node.gpu_slot = value
        elif tier is Tier.HOST:
            node.host_slot = value
        else:
            node.on_disk = bool(value)
        self._count(node, +1)
        self._refresh(node)
        if node.parent is not None and not node.parent.is_root:
            self._refresh(node.parent)
        if self.changes is not None and had != node.has(tier):
            self.changes.add(node, tier, not had)

    @staticmethod
    def is_pinned(node: Node, tier: Tier) -> bool:
        """A lock pins a node's fastest copy only; slower copies are redundant while it lasts."""
        return node.lock_count > 0 and tier == node.fastest

    def _count(self, node: Node, sign: int) -> None:
        for t in TIERS:
            if node.has(t):
                (self.num_locked if self.is_pinned(node, t) else self.num_cached)[t] += sign

    # ---- eviction ---------------------------------------------------------------------------

    def is_evictable(self, node: Node, tier: Tier, leaving: set[Node] | frozenset = frozenset()) -> bool:
        """May `node`'s copy in `tier` go, if the nodes in `leaving` have left that tier?"""
        if node.is_root or not node.has(tier):
            return False
        if node.fastest < tier:
            return True  # a faster copy stays: this one is redundant, locked or not
        if node.lock_count:
            return False
        return not any(c not in leaving and c.fastest is not None and c.fastest <= tier
                       for c in node.children.values())

    def _refresh(self, node: Node) -> None:
        for t in TIERS:
            if self.is_evictable(node, t):
                self.evictable[t].add(node)
            else:
                self.evictable[t].discard(node)

    def select_victims(self, tier: Tier, n: int, keep: set[Node] | frozenset = frozenset(),
                       namespace: bytes | None = None) -> list[Node]:
        """Up to `n` nodes whose copies in `tier` can go, in eviction order, leaf-first,
        never one in `keep` (and only of `namespace`, if given).

        Pure: changes nothing. Victims come lowest priority first, then least recently used;
        a parent becomes a candidate once all its children in the tier are chosen."""
        now = self.clock()
        # a node under retention counts at its retention priority until its deadline
        key = lambda v: (max(v.priority, v.retain_priority) if v.retain_until > now else v.priority,  # noqa: E731
                         v.last_access, v.serial, v)
        heap = [key(v) for v in self.evictable[tier]
                if v not in keep and (namespace is None or v.namespace == namespace)]
        heapq.heapify(heap)
        chosen: list[Node] = []
        leaving: set[Node] = set()
        while heap and len(chosen) < n:
            victim = heapq.heappop(heap)[-1]
            chosen.append(victim)
            leaving.add(victim)
            parent = victim.parent
            if (parent not in leaving and parent not in self.evictable[tier] and parent not in keep
                    and self.is_evictable(parent, tier, leaving)):
                heapq.heappush(heap, key(parent))
        return chosen

    # ---- invariants -------------------------------------------------------------------------

    def check_integrity(self) -> None:
        cached = {t: 0 for t in TIERS}
        locked = {t: 0 for t in TIERS}
        count = 0
        for root in self.roots.values():
            assert root.is_root and root.children, f"empty or detached root {root}"
        for n in self.nodes():
            count += 1
            p = n.parent
            assert p.children.get(n.key) is n, f"{n} not linked from its parent"
            fastest = n.fastest
            assert fastest is not None or n.lock_count, f"{n} has no copy and no lock"
            if not p.is_root and fastest is not None and p.fastest is not None:
                assert p.fastest <= fastest, f"{n} faster than parent {p}"
            if n.lock_count:
                assert p.is_root or p.lock_count, f"{n} locked under unlocked {p}"
            for t in TIERS:
                if n.has(t):
                    (locked if self.is_pinned(n, t) else cached)[t] += 1
                assert (n in self.evictable[t]) == self.is_evictable(n, t), f"{n} evictable[{t.name}]"
        assert count == self.num_nodes, f"{count} nodes reachable, {self.num_nodes} counted"
        assert cached == self.num_cached, f"cached copies {cached} != counted {self.num_cached}"
        assert locked == self.num_locked, f"locked copies {locked} != counted {self.num_locked}"
        on_gpu = Counter(n.namespace for n in self.nodes() if n.gpu_slot is not None)
        assert on_gpu == +self.gpu_blocks, f"GPU copies per namespace {on_gpu} != counted {self.gpu_blocks}"


class Changes:
    """The copies that appeared or went, in order, as (node, tier, present), for whoever drains
    them (the KV events: engine/serving/kv_events.py); `pending` is set while any wait."""

    def __init__(self) -> None:
        self._items: deque[tuple[Node, Tier, bool]] = deque()
        self.pending = asyncio.Event()

    def add(self, node: Node, tier: Tier, present: bool) -> None:
        self._items.append((node, tier, present))
        self.pending.set()

    def take(self) -> list[tuple[Node, Tier, bool]]:
        """Every change since the last `take`, oldest first."""
        items = list(self._items)
        self._items.clear()
        self.pending.clear()
        return items
