"""CUDA graphs of the model's forward pass for decode-only steps.

A decode step of B sequences launches hundreds of small kernels from Python; replaying a
captured graph launches them in one go. One graph per batch-size bucket, captured on first use
against static input buffers. A step of n sequences runs in the smallest bucket >= n; the
padding rows repeat row 0 (same token, position and KV slot), so they rewrite identical K/V into
the same slot and their logits are ignored.
"""
from __future__ import annotations

import logging

import torch

from engine.attention import DecodeBatch, PagedMetadata

log = logging.getLogger("kvgate.engine")

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, pool: torch.Tensor, max_batch: int, max_blocks: int) -> None:
        self.model = model
        self.pool = pool
        self.buckets = [b for b in BUCKETS if b < max_batch] + [min(max_batch, BUCKETS[-1])]
        self.max_batch = self.buckets[-1]
        dev = pool.device
        n = self.max_batch
        # static inputs, [max_batch] (tables: [max_batch, max_blocks]); a replay reads their first B rows
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_block = torch.zeros(n, dtype=torch.long, device=dev)
        self.slot_offset = torch.zeros(n, dtype=torch.long, device=dev)
        self.tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=dev)
        self.lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.rows = torch.arange(n, device=dev)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._mempool = torch.cuda.graph_pool_handle()
        self.broken = False            # capture failed once: stay eager

    def capture_all(self) -> None:
        """Capture every bucket now (at start-up: the inputs point at block 0, which holds
        nothing yet), so that no request waits for a capture."""
        for buf in (self.input_ids, self.positions, self.slot_block, self.slot_offset, self.tables):
            buf.zero_()
        self.lens.fill_(1)
        for b in self.buckets:
            if b not in self._graphs:
                self._graphs[b] = self._capture(b)

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def run(self, ids: torch.Tensor, positions: torch.Tensor, slot_block: torch.Tensor,
            slot_offset: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """Logits [n, vocab] of one decode step of n sequences (inputs on the device)."""
        n = ids.numel()
        b = self.bucket(n)
        for buf, src in ((self.input_ids, ids), (self.positions, positions), (self.slot_block, slot_block),
                         (self.slot_offset, slot_offset), (self.lens, lens)):
            buf[:n] = src
            buf[n:b] = src[0]
        self.tables[:n, :tables.shape[1]] = tables
        self.tables[n:b, :tables.shape[1]] = tables[0]
        if b not in self._graphs:
            self._graphs[b] = self._capture(b)
        graph, logits = self._graphs[b]
        graph.replay()
        return logits[:n]

    def _forward(self, b: int) -> torch.Tensor:
        meta = PagedMetadata(self.pool, self.slot_block[:b], self.slot_offset[:b], seqs=(),
                             decode=DecodeBatch(self.rows[:b], self.tables[:b], self.lens[:b]))
        return self.model(input_ids=self.input_ids[:b][None], position_ids=self.positions[:b][None],
                          use_cache=False, logits_to_keep=self.rows[:b], kvgate=meta).logits[0]

    def _capture(self, b: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        side = torch.cuda.Stream(self.pool.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):        # warm-up outside the graph (Triton compiles here)
            self._forward(b)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread-local: the event loop and the disk thread keep using CUDA while we capture
        with torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
            logits = self._forward(b)
        log.info("captured the decode graph for batch size %d", b)
        return graph, logits
