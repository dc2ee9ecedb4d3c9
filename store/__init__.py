"""store/: the radix index of hashed KV blocks and the tiered block store (GPU -> host -> disk).

Knows nothing of models or HTTP. See docs/store.md. Names are imported when first used (PEP
562): `store.config` and `store.keys` load without torch, for the configuration's checks.
"""
import importlib

_WHERE = {
    "BlockStore": "block_store", "LoadStep": "block_store", "PrefixMatch": "block_store", "SeqBlocks": "block_store",
    "StoreConfig": "config", "WRITE_POLICIES": "config",
    "DiskTierError": "errors", "OutOfBlocks": "errors", "StoreError": "errors",
    "BlockKeys": "keys", "Scope": "keys", "block_keys": "keys", "chain_key": "keys", "root_key": "keys",
    "token_bytes": "keys",
    "BlockLayout": "pool", "Tier": "pool",
    "StoreStats": "stats", "TierStats": "stats",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'store' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"store.{_WHERE[name]}"), name)
    globals()[name] = value          # once
    return value
