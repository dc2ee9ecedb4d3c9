"""Exceptions raised by store/. The gateway translates them at the edge."""
from __future__ import annotations


class StoreError(Exception):
    """Base class of every error store/ raises on purpose."""


class OutOfBlocks(StoreError):
    """An allocation could not be satisfied even after evicting every evictable block.
    Nothing was changed by the failed call."""


class DiskTierError(StoreError):
    """The disk tier cannot be opened or used (missing permissions, not a directory, ...)."""


class PublicPrefixesFull(StoreError):
    """Declaring a prefix public would let public blocks take more than their share of the GPU
    pool (BlockStore.declare_public). Nothing was declared."""
