"""store/: the radix index of hashed KV blocks and the tiered block store (GPU -> host -> disk).

Knows nothing of models or HTTP. See docs/store.md.
"""
from store.block_store import BlockStore, LoadStep, PrefixMatch, SeqBlocks, StoreConfig
from store.errors import DiskTierError, OutOfBlocks, StoreError
from store.keys import BlockKeys, Scope, block_keys, chain_key, root_key, token_bytes
from store.placement import WRITE_POLICIES
from store.pool import BlockLayout, Tier
from store.stats import StoreStats, TierStats

__all__ = [
    "BlockKeys", "BlockLayout", "BlockStore", "LoadStep", "DiskTierError", "OutOfBlocks", "PrefixMatch", "SeqBlocks",
    "Scope", "StoreConfig", "StoreError", "StoreStats", "Tier", "TierStats", "block_keys", "chain_key",
    "root_key", "token_bytes", "WRITE_POLICIES",
]
