"""Block pools: one preallocated tensor of KV blocks per tier, with a free list.

A pool tensor is page-major, `[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`
(2 = key, value), so each block is one contiguous region and moves in one copy.
"""
from __future__ import annotations

import heapq
import math
import mmap
import os
import weakref
from dataclasses import dataclass
from enum import IntEnum

import torch

from store.errors import OutOfBlocks


class Tier(IntEnum):
    """Where a block's KV lives; lower is faster."""
    GPU = 0
    HOST = 1
    DISK = 2


@dataclass(frozen=True)
class BlockLayout:
    """The shape of one KV block; fixed by the model and the block size."""
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"BlockLayout.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        return math.prod(self.block_shape) * self.dtype.itemsize


class BlockPool:
    """`num_blocks` KV blocks in one tensor, and which of them are free.

    Allocation hands out the lowest free slots first, so blocks allocated together tend to be
    contiguous and move between tiers in few large copies. With `scratch`, the tensor has one
    block more, `self.scratch` (= num_blocks), which is never allocated: writes that must land
    somewhere but belong to no sequence (the padding rows of a CUDA graph's step) go there.
    With `shared`, a host pool lives in an anonymous shared-memory file (`self.fd`) that the
    disk process maps too (store/disk_process.py).
    """

    def __init__(self, tier: Tier, layout: BlockLayout, num_blocks: int,
                 device: torch.device | str, pin_memory: bool = False, scratch: bool = False,
                 shared: bool = False) -> None:
        if num_blocks < 0:
            raise ValueError(f"{tier.name.lower()} pool: num_blocks must be >= 0, got {num_blocks}")
        self.tier = tier
        self.layout = layout
        self.num_blocks = num_blocks
        self.scratch = num_blocks if scratch else None
        # [num_blocks (+ 1 scratch), num_layers, 2, block_size, num_kv_heads, head_dim]
        shape = (num_blocks + bool(scratch), *layout.block_shape)
        self.fd: int | None = None
        if shared and num_blocks:
            self.fd, self.tensor = _shared_tensor(shape, layout.dtype, pin_memory)
            weakref.finalize(self, os.close, self.fd)
        else:
            self.tensor = torch.empty(shape, dtype=layout.dtype, device=device, pin_memory=pin_memory)
        # on the CPU: the same memory as bytes, [num_blocks (+ 1), block_bytes] — what the disk
        # tier reads and writes (a view without a tensor op, and the offsets the disk process
        # finds blocks at)
        self.bytes = self.tensor.view(torch.uint8).reshape(self.tensor.shape[0], layout.block_bytes).numpy() \
            if self.tensor.device.type == "cpu" else None
        self._free_heap = list(range(num_blocks))  # already a valid min-heap
        self._is_free = bytearray(b"\x01") * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free_heap)

    def allocate(self, n: int) -> list[int]:
        """`n` free slots, lowest first; raises OutOfBlocks (and changes nothing) if too few."""
        if n > len(self._free_heap):
            raise OutOfBlocks(f"{self.tier.name.lower()} pool: {n} blocks asked, "
                              f"{len(self._free_heap)} free of {self.num_blocks}")
        slots = [heapq.heappop(self._free_heap) for _ in range(n)]
        for s in slots:
            self._is_free[s] = 0
        return slots

    def free(self, slots: list[int]) -> None:
        for s in slots:
            if self._is_free[s]:
                raise AssertionError(f"{self.tier.name.lower()} pool: slot {s} freed twice")
            self._is_free[s] = 1
            heapq.heappush(self._free_heap, s)

    def free_slots(self) -> set[int]:
        return set(self._free_heap)


def _shared_tensor(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> tuple[int, torch.Tensor]:
    """A CPU tensor in a new anonymous shared-memory file (its descriptor, the tensor), page-locked
    for asynchronous GPU copies when `pin` (registered with CUDA, as pinned memory is)."""
    nbytes = math.prod(shape) * dtype.itemsize
    fd = os.memfd_create("kvgate-blocks")
    try:
        os.ftruncate(fd, nbytes)
        mapping = mmap.mmap(fd, nbytes)
    except OSError:
        os.close(fd)
        raise
    tensor = torch.frombuffer(mapping, dtype=torch.uint8).view(dtype).view(shape)
    if pin:          # as torch pins shared tensors; 1 = cudaHostRegisterPortable
        error = int(torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), nbytes, 1))
        if error:
            raise RuntimeError(f"cannot pin {nbytes >> 20} MiB of shared memory (cudaHostRegister: error {error})")
        # unregistered before the mapping goes (the finalizer holds it until then); at exit the
        # process goes with it
        weakref.finalize(tensor, _unpin, tensor.data_ptr(), mapping).atexit = False
    return fd, tensor


def _unpin(address: int, _mapping: mmap.mmap) -> None:
    torch.cuda.cudart().cudaHostUnregister(address)
