"""The model runner: turns a step's chunks into one flat forward pass and samples.

`prepare` runs on the event loop (it reads block tables from the store) and builds CPU tensors;
`launch` runs on the forward thread: it moves them to the device, runs the model with paged
attention writing K/V into the store's GPU pool, and samples one token per finishing chunk,
without waiting for the device; `collect` waits for those tokens. Between the two the loop
schedules and launches the next step, whose decode rows take their input tokens straight from
this step's sampled tensor (`StepInput.pending`): on CUDA the GPU never waits for the CPU's
part of a step (engine/engine.py, "The loop").
"""
from __future__ import annotations

import collections
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from engine import kernels
from engine.attention import DecodeBatch, PagedMetadata, PrefillBatch, SeqSlice
from engine.costs import LoadOrRecompute
from engine.graphs import StepGraphs, fill_pending
from engine.model import LoadedModel
from engine.sampling import SamplingParams, logprobs_on_device, sample_on_device
from engine.scheduler import Chunk
from engine.sequence import Logprob
from store import BlockStore

log = logging.getLogger("kvgate.engine")


@dataclass(frozen=True)
class StepInput:
    input_ids: torch.Tensor          # [T] the new tokens of every chunk, chunk after chunk
    positions: torch.Tensor          # [T] their positions in their sequences
    slot_block: torch.Tensor         # [T] pool block receiving each token's K/V
    slot_offset: torch.Tensor        # [T] offset inside it
    seqs: tuple[SeqSlice, ...]       # chunks for the reference path (block tables on the CPU)
    decode: DecodeBatch | None       # one-token chunks for the decode kernel (CPU tensors)
    prefill: PrefillBatch | None     # longer chunks for the prefill kernel (CPU tensors)
    sample_rows: torch.Tensor        # [N] rows of the flat batch whose logits are sampled
    params: list[SamplingParams]     # [N]
    generators: list[torch.Generator | None]  # [N]
    histories: list[tuple[list[int], int] | None] | None = None   # [N] (token ids, prompt length) where
                                                                 # the row's params have logits processors
    # rows of input_ids ([P]) whose token a launched step samples, and their rows in its tokens
    # ([P]): input_ids holds 0 there, and `launch` takes them from `previous` on the device
    pending: tuple[torch.Tensor, torch.Tensor] | None = None
    previous: torch.Tensor | None = None      # [N'] that step's sampled tokens (Launched.tokens)


@dataclass
class Launched:
    """A step queued on the device: its sampled tokens, and their copy to the host under way."""
    tokens: torch.Tensor             # [N] on the device
    failed: list[int]                # rows whose sampling failed (None in `collect`)
    seconds: float | None = None     # how long the device computed it: known on the CPU, else after `collect`
    host: torch.Tensor | None = None         # [N] pinned (CUDA): `tokens`, once `done` fires
    start: torch.cuda.Event | None = None    # (CUDA) recorded before its first kernel
    done: torch.cuda.Event | None = None     # (CUDA) recorded after the copies to the host
    # the rows asking for logprobs, and theirs (sampling.logprobs_on_device: [R], [R, K], [R, K]),
    # copied to the host like the tokens
    logprob_rows: list[tuple[int, int]] = field(default_factory=list)    # (row, most likely tokens asked)
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    row_logprobs: list[Logprob | None] = field(default_factory=list)   # [N] if any row asked, set by `collect`


class ModelRunner:
    def __init__(self, loaded: LoadedModel, store: BlockStore, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 4096) -> None:
        self.model = loaded.model
        self.device = loaded.device
        # tokens the model's generation config suppresses (transformers' SuppressTokensLogitsProcessor)
        suppress = getattr(loaded.model.generation_config, "suppress_tokens", None) or []
        self.suppressed = torch.tensor(suppress, dtype=torch.long, device=self.device) if suppress else None
        self.store = store
        self.block_size = store.block_size
        self.max_model_len = loaded.max_model_len
        window = getattr(loaded.model.config, "sliding_window", None)
        # the decode kernel attends over the whole context: not for windows shorter than it
        self.use_kernel = kernels.available(self.device) and (
            not window or window >= loaded.max_model_len)
        self.graphs = None
        self.steps: collections.Counter[str] = collections.Counter()   # forward passes: decode, mixed (graphs), eager
        if self.use_kernel and self.device.type == "cuda":
            self.graphs = StepGraphs(self.model, store.gpu.tensor, store.gpu.scratch, max_num_seqs,
                                     math.ceil(loaded.max_model_len / self.block_size), max_num_batched_tokens)

    def prepare(self, chunks: list[Chunk], previous: Launched | None = None) -> StepInput:
        """The step's inputs as CPU tensors, built from plain lists (a decode step of hundreds of
        sequences must cost well under a millisecond here). A sequence whose last token is still
        `pending` takes it from `previous`, the step that samples it, at row `seq.sample_row`."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int | np.ndarray] = []  # per chunk: block * block_size + offset of its tokens
        seqs, rows, params, generators, histories = [], [], [], [], []
        decode_rows, decode_tables, decode_lens = [], [], []
        tiles, prefill_chunks, prefill_tables = [], [], []
        pending_rows, previous_rows = [], []
        for c in chunks:
            seq = c.seq
            q, end = len(ids), c.start + c.num_tokens
            table = self.store.block_table(seq.request_id)[:-(-end // bs)]
            ids += seq.token_ids[c.start:end]
            if end > len(seq.token_ids):        # the one token after the known ones is in flight
                assert seq.pending and end == len(seq.token_ids) + 1, "a chunk past its sequence's tokens"
                pending_rows.append(len(ids))
                previous_rows.append(seq.sample_row)
                ids.append(0)
            positions += range(c.start, end)
            if c.num_tokens == 1:
                slots.append(table[c.start // bs] * bs + c.start % bs)
            else:
                pos = np.arange(c.start, end)
                slots.append(np.asarray(table)[pos // bs] * bs + pos % bs)
            if self.use_kernel and c.num_tokens == 1:
                decode_rows.append(q)
                decode_tables.append(table)
                decode_lens.append(end)
            elif self.use_kernel:
                tiles += [(len(prefill_chunks), m) for m in range(0, c.num_tokens, kernels.PREFILL_TILE)]
                prefill_chunks.append((q, c.num_tokens, end))
                prefill_tables.append(table)
            else:
                seqs.append(SeqSlice(q, c.num_tokens, end, torch.tensor(table)))
            if c.samples:
                rows.append(q + c.num_tokens - 1)
                params.append(seq.params)
                generators.append(seq.generator)
                histories.append((list(seq.token_ids), seq.prompt_len) if seq.params.processes else None)
        decode = prefill = None
        if decode_rows:
            decode = DecodeBatch(torch.tensor(decode_rows), _padded(decode_tables),
                                 torch.tensor(decode_lens, dtype=torch.int32))
        if prefill_chunks:
            prefill = PrefillBatch(torch.tensor(tiles, dtype=torch.int32),
                                   torch.tensor(prefill_chunks, dtype=torch.int32), _padded(prefill_tables))
        slot = torch.tensor(slots) if len(slots) == len(ids) else torch.from_numpy(
            np.concatenate([np.atleast_1d(x) for x in slots]))
        pending = None
        if pending_rows:
            if previous is None:
                raise ValueError("a pending token without the step that samples it")
            pending = torch.tensor(pending_rows), torch.tensor(previous_rows)
        return StepInput(torch.tensor(ids), torch.tensor(positions), slot // bs, slot % bs, tuple(seqs),
                         decode, prefill, torch.tensor(rows, dtype=torch.long), params, generators, histories,
                         pending, None if pending is None else previous.tokens)

    def execute(self, step: StepInput) -> list[int | None]:
        """`launch`, then `collect`: one sampled token per sample row."""
        return self.collect(self.launch(step))

    @torch.inference_mode()
    def launch(self, step: StepInput) -> Launched:
        """Queue one forward pass over the whole step and its sampling; on CUDA, return without
        waiting for the device (the tokens' copy to the host is queued too)."""
        cuda = self.device.type == "cuda"
        begun = time.perf_counter()
        start = torch.cuda.Event(enable_timing=True) if cuda else None
        if start is not None:
            start.record()
        logits = self._forward(step)                    # [sample rows, V]
        if self.suppressed is not None:
            logits[:, self.suppressed] = float("-inf")
        asked = [(i, p.logprobs) for i, p in enumerate(step.params) if p.logprobs is not None]
        if asked:      # the model's distribution: before logits processors and temperature (vLLM's raw logprobs)
            index = torch.tensor([i for i, _ in asked]).to(logits.device, non_blocking=True)
            distribution = logits[index].float().log_softmax(-1)
        tokens, failed = sample_on_device(logits, step.params, step.generators, step.histories)
        logprobs = logprobs_on_device(distribution, tokens[index], max(k for _, k in asked)) if asked else None
        if not cuda:
            return Launched(tokens, failed, time.perf_counter() - begun, logprob_rows=asked, logprobs=logprobs)
        host = _to_host(tokens)
        logprobs = None if logprobs is None else tuple(map(_to_host, logprobs))
        done = torch.cuda.Event(enable_timing=True)
        done.record()
        return Launched(tokens, failed, None, host, start, done, asked, logprobs)

    @staticmethod
    def collect(launched: Launched) -> list[int | None]:
        """Wait for a launched step's tokens (None where sampling failed); their logprobs, for
        the rows that asked, go to `launched.row_logprobs`."""
        if launched.done is not None:
            launched.done.synchronize()
            launched.seconds = launched.start.elapsed_time(launched.done) / 1e3
        out: list[int | None] = (launched.host if launched.host is not None else launched.tokens).tolist()
        for i in launched.failed:
            out[i] = None
        if launched.logprobs is not None:
            launched.row_logprobs = [None] * len(out)
            chosen, top_values, top_ids = (x.tolist() for x in launched.logprobs)
            for r, (i, k) in enumerate(launched.logprob_rows):
                launched.row_logprobs[i] = (chosen[r], list(zip(top_ids[r][:k], top_values[r][:k])))
        return out

    def _forward(self, step: StepInput) -> torch.Tensor:
        """The logits of the step's sample rows, [N, V] (N may be 0), from its graph if it has one."""
        graph = None if self.graphs is None or self.graphs.broken else self.graphs.choose(step)
        if graph is not None:
            try:
                logits = self.graphs.run(graph, step)
                self.steps[graph[0]] += 1
                return logits
            except RuntimeError:
                log.exception("replaying a CUDA graph failed; running eagerly from now on")
                self.graphs.broken = True
        self.steps["eager"] += 1
        dev = self.device
        to = lambda x: x.to(dev, non_blocking=True)    # noqa: E731  (CPU tensors made for this step)
        meta = PagedMetadata(
            kv_pool=self.store.gpu.tensor, slot_block=to(step.slot_block), slot_offset=to(step.slot_offset),
            seqs=tuple(SeqSlice(s.q_start, s.q_len, s.ctx_len, to(s.block_table)) for s in step.seqs),
            decode=None if step.decode is None else DecodeBatch(*map(to, (
                step.decode.rows, step.decode.block_tables, step.decode.context_lens))),
            prefill=None if step.prefill is None else PrefillBatch(*map(to, (
                step.prefill.tiles, step.prefill.chunks, step.prefill.block_tables))))
        # logits only where a token is sampled (at least one row: prompt chunks may sample none)
        rows = step.sample_rows if len(step.sample_rows) else torch.tensor([step.input_ids.numel() - 1])
        input_ids = to(step.input_ids)
        fill_pending(input_ids, step)
        out = self.model(input_ids=input_ids[None], position_ids=to(step.positions)[None],
                         use_cache=False, logits_to_keep=to(rows), kvgate=meta)
        return out.logits[0][:len(step.sample_rows)]

    @torch.inference_mode()
    def warmup(self, costs: LoadOrRecompute, prefill_tokens: int) -> None:
        """On CUDA, before serving: compile both attention kernels and capture the CUDA graphs,
        so that the first requests do not pay for it; then seed the load-or-recompute rates by
        timing a prefill of `prefill_tokens` tokens and a batched host -> GPU copy. Writes K/V
        only into the GPU pool's scratch block and copies into free slots: what the pool holds
        is left as it was."""
        if not self.use_kernel or self.device.type != "cuda":
            return
        self._dummy_prefill(self.block_size)
        if self.graphs is not None:
            try:
                self.graphs.capture_all()
            except RuntimeError:             # e.g. out of memory: serve, eagerly
                log.exception("capturing the CUDA graphs failed; every step runs eagerly")
                self.graphs.broken = True
        n = min(prefill_tokens, self.max_model_len)
        self._dummy_prefill(n)                                   # compiled for this size too
        torch.cuda.synchronize()
        start = time.perf_counter()
        self._dummy_prefill(n)
        torch.cuda.synchronize()
        costs.prefill_tokens_per_s = n / (time.perf_counter() - start)
        blocks = min(64, self.store.host.num_blocks, self.store.gpu.num_free)
        if blocks:
            free = sorted(self.store.gpu.free_slots())[:blocks]
            self.store.copier.to_gpu(list(range(blocks)), free)  # first use allocates its staging
            torch.cuda.synchronize()
            start = time.perf_counter()
            self.store.copier.to_gpu(list(range(blocks)), free)
            torch.cuda.synchronize()
            costs.host_bytes_per_s = blocks * self.store.layout.block_bytes / (time.perf_counter() - start)
        log.info("measured: prefill %.0f tokens/s, host -> GPU %s", costs.prefill_tokens_per_s,
                 f"{costs.host_bytes_per_s / 1e9:.1f} GB/s" if blocks else "-")

    def _dummy_prefill(self, n: int) -> None:
        """A prefill of n tokens at positions 0..n-1 whose K/V all land in the scratch block."""
        dev, bs = self.device, self.block_size
        zeros = torch.zeros(n, dtype=torch.long, device=dev)
        scratch = torch.full((n,), self.store.gpu.scratch, dtype=torch.long, device=dev)
        positions = torch.arange(n, device=dev)
        tiles = torch.tensor([(0, m) for m in range(0, n, kernels.PREFILL_TILE)], dtype=torch.int32,
                             device=dev)
        prefill = PrefillBatch(tiles, torch.tensor([[0, n, n]], dtype=torch.int32, device=dev),
                               scratch[:-(-n // bs)][None].to(torch.int32))
        meta = PagedMetadata(self.store.gpu.tensor, scratch, positions % bs, (), None, prefill)
        self.model(input_ids=zeros[None], position_ids=positions[None], use_cache=False,
                   logits_to_keep=positions[-1:], kvgate=meta)


def _to_host(x: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of `x`, queued (read it once the step's `done` event fires)."""
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    return host


def _padded(tables: list[list[int]]) -> torch.Tensor:
    """Block tables as one [n, widest] int32 tensor, padded with block 0."""
    width = max(map(len, tables))
    flat = np.zeros((len(tables), width), dtype=np.int32)
    for i, t in enumerate(tables):
        flat[i, :len(t)] = t
    return torch.from_numpy(flat)
