"""CUDA graphs of the model's forward pass, for decode steps and for mixed steps.

Run eagerly, a step of the 8B shape spends 20-30 ms of CPU launching hundreds of small kernels
from Python, whatever its size; replaying a captured graph launches them in one go. Every graph
is captured at start-up against static input buffers; a step copies its inputs into them and
replays the graph of its bucket. Two kinds:

- **decode**, one graph per batch-size bucket (BUCKETS): steps whose every chunk is one token.
  A step of n sequences runs in the smallest bucket >= n; the padding rows are token 0 at
  position 0 of the pool's scratch block (a block no sequence owns), attending to it alone:
  they all write the same K/V there, and their logits are ignored.
- **mixed**, one graph per token bucket T (MIXED_BUCKETS): steps with prompt chunks (at most
  MAX_CHUNKS) beside any decode rows, fewer than T tokens in all: a returning user's new turn
  joining the running batch. The kernels' grids are fixed at capture and sized for T, so a
  replay pads everything to that size: padding tokens write their K/V into the pool's scratch
  block (a block no sequence owns), unused decode rows have context 0 and unused prefill tiles
  point at an empty chunk, so both compute nothing, and row T-1, always padding, takes their
  (ignored) output. Padding rows never mix with real ones: every op but attention is per row.

Larger steps run eagerly: there the GPU's work hides the launches.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine import kernels
from engine.attention import DecodeBatch, PagedMetadata, PrefillBatch

if TYPE_CHECKING:
    from engine.runner import StepInput

log = logging.getLogger("kvgate.engine")

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
MIXED_BUCKETS = (64, 128, 256, 512, 1024)
MAX_CHUNKS = 8            # prompt chunks in a graphed mixed step
# split-K parts of the decode kernel in a mixed graph (its grid is fixed at capture): enough to
# fill the GPU with this many sequences; a shorter context uses fewer parts
MIXED_DECODE_FILL = 16


@dataclass(frozen=True)
class MixedShape:
    """The capacities of the mixed graph of bucket `tokens`."""
    tokens: int           # T: rows of the flat batch; the last is always padding
    decode: int           # decode rows
    tiles: int            # prefill tiles (each chunk adds at most one partial tile)
    samples: int          # rows whose logits are computed

    @classmethod
    def of(cls, tokens: int, max_batch: int) -> MixedShape:
        decode = min(tokens - 1, max_batch)
        return cls(tokens, decode, tokens // kernels.PREFILL_TILE + MAX_CHUNKS,
                   min(tokens - 1, decode + MAX_CHUNKS))


def mixed_bucket(buckets: tuple[int, ...], max_batch: int, tokens: int, decode_rows: int,
                 chunks: int) -> int | None:
    """The smallest mixed bucket a step of `tokens` tokens (`decode_rows` of them one-token
    chunks, `chunks` prompt chunks) fits: fewer tokens than T (row T-1 stays padding), no more
    decode rows than it has, at most MAX_CHUNKS prompt chunks. None: run it eagerly."""
    if chunks > MAX_CHUNKS:
        return None
    return next((t for t in buckets if tokens < t and decode_rows <= MixedShape.of(t, max_batch).decode), None)


def padded_mixed_inputs(step: StepInput, shape: MixedShape, scratch: int) -> dict[str, torch.Tensor]:
    """What the static buffers of the mixed graph `shape` hold for `step` (CPU tensors, named
    as the buffers): the step's inputs padded to the graph's capacities. Padding tokens write
    their K/V into block `scratch`; padding decode rows have context 0 and take row T-1, which
    is always padding, as do the padding sample rows; padding tiles point at the empty chunk
    (entry MAX_CHUNKS). Block tables are the step's own width (columns past it are never read)."""
    last = shape.tokens - 1
    long = torch.zeros(0, dtype=torch.long)
    d, p = step.decode, step.prefill
    return dict(
        input_ids=_pad_rows(step.input_ids, shape.tokens, 0),
        positions=_pad_rows(step.positions, shape.tokens, 0),
        slot_block=_pad_rows(step.slot_block, shape.tokens, scratch),
        slot_offset=_pad_rows(step.slot_offset, shape.tokens, 0),
        decode_rows=_pad_rows(d.rows if d is not None else long, shape.decode, last),
        lens=_pad_rows(d.context_lens if d is not None else long.int(), shape.decode, 0),
        tables=d.block_tables if d is not None else torch.zeros(0, 1, dtype=torch.int32),
        tiles=_pad_rows(p.tiles, shape.tiles, torch.tensor([MAX_CHUNKS, 0], dtype=torch.int32)),
        chunks=p.chunks,
        chunk_tables=p.block_tables,
        sample_rows=_pad_rows(step.sample_rows, shape.samples, last))


def fill_pending(input_ids: torch.Tensor, step: StepInput) -> None:
    """Write the pending tokens into `input_ids` (the step's [T] on the device), from the tokens
    of the step that samples them: on the device, queued behind it, never read by the CPU."""
    if step.pending is not None:
        rows, previous = step.pending
        dev = input_ids.device
        input_ids[rows.to(dev, non_blocking=True)] = step.previous[previous.to(dev, non_blocking=True)]


def _pad_rows(src: torch.Tensor, size: int, pad) -> torch.Tensor:
    """src ([n] or [n, k]) followed by rows of `pad` up to `size` rows."""
    out = torch.empty((size, *src.shape[1:]), dtype=src.dtype)
    out[:len(src)] = src
    out[len(src):] = pad
    return out


class StepGraphs:
    def __init__(self, model: torch.nn.Module, pool: torch.Tensor, scratch: int, max_batch: int,
                 max_blocks: int, max_tokens: int) -> None:
        """pool: the GPU pool, whose block `scratch` no sequence owns; max_batch: most sequences
        in a step; max_blocks: the widest block table; max_tokens: most tokens in a step."""
        self.model = model
        self.pool = pool
        self.scratch = scratch
        self.buckets = [b for b in BUCKETS if b < max_batch] + [min(max_batch, BUCKETS[-1])]
        self.max_batch = self.buckets[-1]
        mixed = []
        for t in MIXED_BUCKETS:       # up to the first bucket that holds the largest step
            mixed.append(t)
            if t > max_tokens:
                break
        self.mixed = tuple(mixed)
        self.decode_parts = kernels._partitions(MIXED_DECODE_FILL * pool.shape[4], max_blocks * pool.shape[3],
                                                kernels.TILE, pool.device)
        top = MixedShape.of(self.mixed[-1], self.max_batch)
        dev = pool.device
        n = max(self.max_batch, top.tokens)
        i32 = dict(dtype=torch.int32, device=dev)
        # static inputs; a replay reads the first rows of each
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)            # [n]
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)            # [n]
        self.slot_block = torch.zeros(n, dtype=torch.long, device=dev)           # [n]
        self.slot_offset = torch.zeros(n, dtype=torch.long, device=dev)          # [n]
        self.tables = torch.zeros(self.max_batch, max_blocks, **i32)             # decode rows' block tables
        self.lens = torch.ones(self.max_batch, **i32)                            # their context lengths
        self.rows = torch.arange(n, device=dev)                                  # 0..n-1 (decode graphs)
        self.decode_rows = torch.zeros(self.max_batch, dtype=torch.long, device=dev)  # mixed: decode rows
        self.sample_rows = torch.zeros(top.samples, dtype=torch.long, device=dev)     # mixed: rows sampled
        self.tiles = torch.zeros(top.tiles, 2, **i32)                            # mixed: prefill tiles
        # mixed: prompt chunks (first row, length, context); entry MAX_CHUNKS stays empty (0, 0, 0)
        self.chunks = torch.zeros(MAX_CHUNKS + 1, 3, **i32)
        self.chunk_tables = torch.zeros(MAX_CHUNKS + 1, max_blocks, **i32)
        self._graphs: dict[tuple[str, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._mempool = torch.cuda.graph_pool_handle()
        self.broken = False            # a capture or replay failed once: stay eager

    def capture_all(self) -> None:
        """Capture every graph now (at start-up), so that no request waits for a capture. The
        inputs point at the scratch block and at contexts of length 0 (mixed) or 1 (decode)."""
        for buf in (self.input_ids, self.positions, self.slot_offset, self.tiles):
            buf.zero_()
        self.slot_block.fill_(self.scratch)
        self.lens.fill_(1)
        self.tables.fill_(self.scratch)
        for b in self.buckets:
            self._capture(("decode", b))
        self.tiles[:, 0] = MAX_CHUNKS
        self.lens.zero_()
        for t in self.mixed:
            self.decode_rows.fill_(t - 1)
            self.sample_rows.fill_(t - 1)
            self._capture(("mixed", t))

    def choose(self, step: StepInput) -> tuple[str, int] | None:
        """The graph that runs `step`, or None (run it eagerly)."""
        n = step.input_ids.numel()
        decode_rows = 0 if step.decode is None else step.decode.rows.numel()
        if step.seqs or (step.prefill is None and step.decode is None):
            return None
        if step.prefill is None:
            b = next((b for b in self.buckets if b >= n), None)
            return None if b is None or not len(step.sample_rows) else ("decode", b)
        t = mixed_bucket(self.mixed, self.max_batch, n, decode_rows, step.prefill.chunks.shape[0])
        return None if t is None else ("mixed", t)

    def run(self, key: tuple[str, int], step: StepInput) -> torch.Tensor:
        """Logits [number of sample rows, vocab] of `step` (CPU inputs), replayed in graph `key`."""
        kind, size = key
        n = step.input_ids.numel()
        if kind == "decode":                     # padding rows: token 0 at position 0 of the scratch block
            d = step.decode
            self._copy_in(dict(
                input_ids=_pad_rows(step.input_ids, size, 0), positions=_pad_rows(step.positions, size, 0),
                slot_block=_pad_rows(step.slot_block, size, self.scratch),
                slot_offset=_pad_rows(step.slot_offset, size, 0), lens=_pad_rows(d.context_lens, size, 1),
                tables=_pad_rows(d.block_tables, size, self.scratch)))
        else:
            self._copy_in(padded_mixed_inputs(step, MixedShape.of(size, self.max_batch), self.scratch))
        fill_pending(self.input_ids[:n], step)
        if key not in self._graphs:          # not captured at start-up (an engine driven by hand)
            self._capture(key)
        graph, logits = self._graphs[key]
        graph.replay()
        if kind == "mixed":                      # its graph computed the sample rows' logits only
            return logits[:len(step.sample_rows)]
        if len(step.sample_rows) < n:            # a one-token prompt chunk that samples nothing
            return logits[step.sample_rows.to(logits.device, non_blocking=True)]
        return logits[:n]

    def _copy_in(self, inputs: dict[str, torch.Tensor]) -> None:
        """One copy into the first rows (and columns) of each named static buffer."""
        for name, src in inputs.items():
            buf = getattr(self, name)
            dst = buf[:src.shape[0], :src.shape[1]] if src.dim() == 2 else buf[:src.shape[0]]
            dst.copy_(src, non_blocking=True)

    def _forward(self, key: tuple[str, int]) -> torch.Tensor:
        kind, size = key
        if kind == "decode":
            meta = PagedMetadata(self.pool, self.slot_block[:size], self.slot_offset[:size], seqs=(),
                                 decode=DecodeBatch(self.rows[:size], self.tables[:size], self.lens[:size]))
            rows = self.rows[:size]
        else:
            s = MixedShape.of(size, self.max_batch)
            meta = PagedMetadata(
                self.pool, self.slot_block[:size], self.slot_offset[:size], seqs=(),
                decode=DecodeBatch(self.decode_rows[:s.decode], self.tables[:s.decode], self.lens[:s.decode],
                                   self.decode_parts),
                prefill=PrefillBatch(self.tiles[:s.tiles], self.chunks, self.chunk_tables))
            rows = self.sample_rows[:s.samples]
        return self.model(input_ids=self.input_ids[:size][None], position_ids=self.positions[:size][None],
                          use_cache=False, logits_to_keep=rows, kvgate=meta).logits[0]

    def _capture(self, key: tuple[str, int]) -> None:
        side = torch.cuda.Stream(self.pool.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):        # warm-up outside the graph (Triton compiles here)
            self._forward(key)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread-local: the event loop and the disk thread keep using CUDA while we capture
        with torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
            logits = self._forward(key)
        self._graphs[key] = graph, logits
        log.info("captured the %s graph for %d %s", key[0], key[1], "sequences" if key[0] == "decode" else "tokens")
