"""The cache, for an operator (the admin API: gateway/admin.py): what each namespace's cache
holds, prefixes dropped, prefixes declared public. Counts and sizes only, never token contents."""
from __future__ import annotations

from collections.abc import Sequence

from store import BlockStore, Scope, Tier
from store.errors import PublicPrefixesFull


def evict(store: BlockStore, namespace: str, token_ids: Sequence[int], public: bool = False) -> int:
    """Drop a prefix (and what follows it) from the cache of `namespace`, or, with `public`, a
    public prefix (and every namespace's blocks after it): blocks no running request holds.
    Returns how many blocks went."""
    scope = Scope(store.public_root) if public else store.scope(namespace, token_ids)
    return store.evict_prefix(scope, list(token_ids))


def usage(store: BlockStore, namespaces: Sequence[str]) -> dict:
    """Blocks and bytes each of `namespaces`, and the public prefixes, hold per tier."""
    counts = store.blocks_by_namespace()
    block = store.layout.block_bytes

    def tiers(root: bytes) -> dict[str, int]:
        found = counts.get(root, {t: 0 for t in Tier})
        return {**{t.name.lower(): n for t, n in found.items()}, "bytes": block * sum(found.values())}
    return {"tenants": {ns: tiers(store.root_key(ns)) for ns in namespaces},
            "public": {**tiers(store.public_root), "prefixes": store.public.count}}


def declare_public(store: BlockStore, token_ids: Sequence[int]) -> int | str:
    """Declare a prefix public (the full blocks of its token ids, shared by every namespace from
    now on): how many blocks, or why not (the public blocks' bound) for the API to answer 400."""
    try:
        return store.declare_public(token_ids)
    except PublicPrefixesFull as e:
        return str(e)


# an admin message's operation -> what carries it out on a store
OPERATIONS = {"evict": evict, "usage": usage, "public": declare_public}


def run(store: BlockStore, op: str, args: list):
    """Carry out an operator's message (checked by the API process)."""
    return OPERATIONS[op](store, *args)
