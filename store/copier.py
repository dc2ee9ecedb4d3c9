"""Batched block copies between the host pool and the GPU pool.

A batch moves many blocks in few large copies: host slots are grouped into runs of consecutive
slots (the pools hand out the lowest free slots, so runs are long), and each run crosses the
link in one copy. Where the GPU slots of a batch are not consecutive, blocks pass through a GPU
staging buffer and are gathered / scattered there by one indexed kernel (device memory is ~80x
faster than the link, so that costs little).

On CUDA every batch runs on a side stream, ordered by events:
  - a batch starts after all work already queued on the compute stream (a block is copied out
    only after the step that wrote it, and copied into a slot only after the step that last
    read that slot);
  - the compute stream waits for the batch before its next kernel (no kernel reads a block
    whose copy-in has not completed). Neither wait blocks the CPU.
CPU code that reads or writes the host pool (the disk tier) first calls `host_ready()`.
Without CUDA the "GPU" pool is a CPU tensor and the same code runs synchronously.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from store.pool import BlockPool


def slot_runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive slots: (position in `slots`, first slot, length)."""
    runs: list[tuple[int, int, int]] = []
    for pos, s in enumerate(slots):
        if runs and runs[-1][1] + runs[-1][2] == s:
            p, first, n = runs[-1]
            runs[-1] = (p, first, n + 1)
        else:
            runs.append((pos, s, 1))
    return runs


class BlockCopier:
    """Moves blocks between `host` and `gpu` pools in batches, off the compute stream."""

    def __init__(self, gpu: BlockPool, host: BlockPool, staging_bytes: int = 64 << 20,
                 compute_stream: torch.cuda.Stream | None = None) -> None:
        self.gpu = gpu
        self.host = host
        self.device = gpu.tensor.device
        self.is_cuda = self.device.type == "cuda"
        staging_blocks = max(1, min(staging_bytes // gpu.layout.block_bytes, gpu.num_blocks))
        # [staging_blocks, num_layers, 2, block_size, num_kv_heads, head_dim], on the GPU side
        self._staging = torch.empty((staging_blocks, *gpu.layout.block_shape),
                                    dtype=gpu.layout.dtype, device=self.device)
        self._side: torch.cuda.Stream | None = None
        self._compute: torch.cuda.Stream | None = None
        self._last: torch.cuda.Event | None = None
        if self.is_cuda:
            self._side = torch.cuda.Stream(self.device)
            self._compute = compute_stream or torch.cuda.current_stream(self.device)

    def to_gpu(self, host_slots: list[int], gpu_slots: list[int], host: BlockPool | None = None) -> None:
        """Queue copies host_slots[i] -> gpu_slots[i] (slots of `host`: the host pool, or the
        disk tier's staging area)."""
        host = self.host if host is None else host
        with self._batch():
            index = None if _consecutive(gpu_slots) else self._index(gpu_slots)
            for start, h, g in self._chunks(host_slots, gpu_slots):
                if index is None or _consecutive(g):
                    for pos, first, n in slot_runs(h):
                        self.gpu.tensor[g[0] + pos:g[0] + pos + n].copy_(
                            host.tensor[first:first + n], non_blocking=True)
                    continue
                staging = self._staging[:len(g)]
                for pos, first, n in slot_runs(h):
                    staging[pos:pos + n].copy_(host.tensor[first:first + n], non_blocking=True)
                self.gpu.tensor.index_copy_(0, index[start:start + len(g)], staging)

    def to_host(self, gpu_slots: list[int], host_slots: list[int], host: BlockPool | None = None) -> None:
        """Queue copies gpu_slots[i] -> host_slots[i] (slots of `host`, as in `to_gpu`)."""
        host = self.host if host is None else host
        with self._batch():
            index = None if _consecutive(gpu_slots) else self._index(gpu_slots)
            for start, g, h in self._chunks(gpu_slots, host_slots):
                if index is None or _consecutive(g):
                    source = self.gpu.tensor[g[0]:g[0] + len(g)]
                else:
                    source = self._staging[:len(g)]
                    torch.index_select(self.gpu.tensor, 0, index[start:start + len(g)], out=source)
                for pos, first, n in slot_runs(h):
                    host.tensor[first:first + n].copy_(source[pos:pos + n], non_blocking=True)

    def per_block_to_gpu(self, host_slots: list[int], gpu_slots: list[int]) -> None:
        """One copy per block: the unbatched baseline the micro-benchmark compares against."""
        with self._batch():
            for h, g in zip(host_slots, gpu_slots):
                self.gpu.tensor[g].copy_(self.host.tensor[h], non_blocking=True)

    def per_block_to_host(self, gpu_slots: list[int], host_slots: list[int]) -> None:
        with self._batch():
            for g, h in zip(gpu_slots, host_slots):
                self.host.tensor[h].copy_(self.gpu.tensor[g], non_blocking=True)

    def host_ready(self) -> None:
        """Block the calling thread until every queued copy is done (host pool safe to touch)."""
        if self._last is not None:
            self._last.synchronize()

    @contextlib.contextmanager
    def _batch(self) -> Iterator[None]:
        if not self.is_cuda:
            yield
            return
        self._side.wait_stream(self._compute)
        with torch.cuda.stream(self._side):
            yield
        self._last = torch.cuda.Event()
        self._last.record(self._side)
        self._compute.wait_event(self._last)

    def _chunks(self, a: list[int], b: list[int]) -> Iterator[tuple[int, list[int], list[int]]]:
        """(offset, a chunk, b chunk): pieces that fit the staging buffer."""
        assert len(a) == len(b)
        step = self._staging.shape[0]
        for i in range(0, len(a), step):
            yield i, a[i:i + step], b[i:i + step]

    def _index(self, slots: list[int]) -> torch.Tensor:
        """`slots` as a device tensor, uploaded once per batch from pinned memory (a pageable
        upload would synchronize the stream)."""
        index = torch.tensor(slots, dtype=torch.long)
        if self.is_cuda:
            index = index.pin_memory()
        return index.to(self.device, non_blocking=True)


def _consecutive(slots: list[int]) -> bool:
    return not slots or (slots[-1] - slots[0] == len(slots) - 1 and all(
        b == a + 1 for a, b in zip(slots, slots[1:])))
