from store import Tier, root_key, token_bytes
from store.keys import block_keys, chain_key
from store.radix import RadixIndex

BS = 2
ROOT = root_key("fp")


def chain(index: RadixIndex, tokens: list[int], tier: Tier = Tier.GPU, priority: int = 0, root=ROOT):
    """Insert every full block of `tokens` with a copy in `tier`; returns the nodes."""
    parent, nodes = index.root(root), []
    tb = token_bytes(tokens)
    for i, key in enumerate(block_keys(root, tb, BS)):
        node = parent.children.get(key) or index.insert(parent, key, tb[i * 8:(i + 1) * 8], priority)
        if not node.has(tier):
            {Tier.GPU: index.set_gpu, Tier.HOST: index.set_host, Tier.DISK: index.set_disk}[tier](
                node, len(nodes) + 1000 * i + 1 if tier is not Tier.DISK else True)
        nodes.append(node)
        parent = node
    return nodes


def match(index: RadixIndex, tokens: list[int], max_blocks: int = 99, root=ROOT):
    """The index's match of `tokens`, with their keys computed as a request's are."""
    tb = token_bytes(tokens)
    return index.match(root, block_keys(root, tb, BS)[:max_blocks], tb, BS)


def test_match_returns_longest_cached_prefix():
    idx = RadixIndex()
    nodes = chain(idx, [1, 2, 3, 4, 5, 6])
    assert match(idx, [1, 2, 3, 4, 9, 9, 7]) == nodes[:2]
    assert match(idx, [1, 2, 3, 4, 5, 6], 2) == nodes[:2]  # max_blocks
    assert match(idx, [2, 2]) == []
    assert match(idx, [1, 2], root=root_key("other model")) == []
    idx.check_integrity()


def test_forced_hash_collision_never_serves_foreign_kv():
    idx = RadixIndex()
    root = idx.root(ROOT)
    # A block whose key is what tokens [7, 8] hash to, but which holds tokens [1, 2]:
    colliding = idx.insert(root, chain_key(ROOT, token_bytes([7, 8])), token_bytes([1, 2]), 0)
    idx.set_gpu(colliding, 0)
    assert match(idx, [7, 8]) == []
    idx.check_integrity()


def test_match_touches_the_path_for_lru():
    idx = RadixIndex()
    a = chain(idx, [1, 1, 2, 2])
    b = chain(idx, [3, 3])
    assert idx.select_victims(Tier.GPU, 1) == [a[1]]  # oldest leaf
    match(idx, [1, 1, 2, 2])
    assert idx.select_victims(Tier.GPU, 1) == [b[0]]


def test_eviction_order_priority_then_lru_and_leaf_first():
    idx = RadixIndex()
    sys_prompt = chain(idx, [1, 1, 2, 2, 3, 3], priority=5)   # older, but kept longer
    chat = chain(idx, [9, 9, 8, 8], priority=0)
    order = idx.select_victims(Tier.GPU, 10)
    assert order == [chat[1], chat[0], sys_prompt[2], sys_prompt[1], sys_prompt[0]]
    assert idx.select_victims(Tier.GPU, 2) == [chat[1], chat[0]]


def test_locked_blocks_and_their_ancestors_are_not_evictable():
    idx = RadixIndex()
    nodes = chain(idx, [1, 1, 2, 2, 3, 3])
    other = chain(idx, [1, 1, 5, 5])
    idx.lock(nodes[:2])
    assert idx.num_locked[Tier.GPU] == 2 and idx.num_cached[Tier.GPU] == 2
    assert idx.select_victims(Tier.GPU, 10) == [nodes[2], other[1]]  # the locked path stays
    idx.unlock(nodes[:2])
    assert len(idx.select_victims(Tier.GPU, 10)) == 4
    idx.check_integrity()


def test_redundant_copy_is_evictable_before_its_children():
    idx = RadixIndex()
    nodes = chain(idx, [1, 1, 2, 2])
    idx.set_host(nodes[0], 7)  # also on the host: that copy is redundant while the GPU holds it
    assert nodes[0] in idx.evictable[Tier.HOST]
    assert nodes[0] not in idx.evictable[Tier.GPU]  # its child is on the GPU
    idx.check_integrity()


def test_remove_leaf_and_empty_root():
    idx = RadixIndex()
    (node,) = chain(idx, [1, 1])
    idx.set_gpu(node, None)
    idx.remove(node)
    assert idx.roots == {} and idx.num_nodes == 0
    idx.check_integrity()
