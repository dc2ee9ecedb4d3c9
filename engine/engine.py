"""The engine: an asyncio API over continuous batching with a tiered prefix cache.

    stream = engine.submit(prompt_ids, SamplingParams(...), priority=0, namespace="")
    async for out in stream: ...           # RequestOutput deltas until finish_reason is set

All engine state lives on the event loop's thread; the forward pass runs on one executor thread
(`ModelRunner.execute`), so the loop keeps serving while the model computes. Every request ends
through `_finish`, which releases its blocks: finished, stopped, aborted or failed.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from engine import limits
from engine.config import EngineConfig
from engine.costs import LoadOrRecompute
from engine.detokenizer import Detokenizer
from engine.errors import InvalidRequest
from engine.fairness import TenantShare
from engine.model import LoadedModel
from engine.runner import Launched, ModelRunner
from engine.request import Request
from engine.sampling import SamplingParams
from engine.scheduler import Chunk, Scheduler
from engine.sequence import Logprob, RequestOutput, RequestStream, Sequence, Status
from store import BlockStore, StoreConfig, Tier

log = logging.getLogger("kvgate.engine")


class Engine:
    def __init__(self, loaded: LoadedModel, config: EngineConfig, store_config: StoreConfig,
                 detokenize: bool = True, on_output: Callable[[RequestOutput], None] | None = None,
                 tenants: dict[str, TenantShare] | None = None) -> None:
        """`detokenize=False`: outputs carry token ids only, and stop strings are left to the
        reader. `on_output`: every output is handed to it, on the loop, as it is made, instead
        of to the request's stream (one call instead of a task wake-up per request and step).
        The engine process uses both (engine/serving/process.py). `tenants`: each tenant's
        share (weight, cap on running sequences), by namespace (engine/fairness.py)."""
        if store_config.block_size != config.block_size:
            raise ValueError(f"store.block_size {store_config.block_size} != "
                             f"engine.block_size {config.block_size}")
        self.loaded = loaded
        self.detokenize = detokenize
        self._on_output = on_output
        cuda = loaded.device.type == "cuda"
        gpu_memory = torch.cuda.get_device_properties(loaded.device).total_memory if cuda else None
        self.configured = config                     # as given: 0 = chosen from the machine
        self.config = config = config.resolved(gpu_memory, store_config.gpu_blocks)
        self.store = BlockStore(store_config, loaded.block_layout(config.block_size), loaded.fingerprint,
                                device=loaded.device)
        self.costs = LoadOrRecompute(self.store, config.load_or_recompute)
        self._wakeup = asyncio.Event()
        self.multi_tenant = bool(tenants)          # reports then show no other tenant's timing
        self.store.cap_gpu_share({name: share.max_kv_share for name, share in (tenants or {}).items()})
        self.scheduler = Scheduler(config, self.store, self.costs, self._wakeup.set, loaded.max_model_len, tenants)
        self.runner = ModelRunner(loaded, self.store, config.max_num_seqs, config.max_num_batched_tokens)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="kvgate-forward")   # forward passes
        self._requests: dict[str, Sequence] = {}
        self._in_flight: list[_Step] = []     # launched steps, until postprocessed (at most two)
        self._ahead: _Step | None = None       # the step left on the device for the next turn
        self._arrivals = itertools.count()
        self._loop_task: asyncio.Task | None = None
        self._stopping = False
        self.integrity_error: AssertionError | None = None   # the first broken invariant seen
        self.miss_reasons: collections.Counter[str] = collections.Counter()   # first misses, by why
        # blocks found at arrival but computed after all, by the tier found in ("gpu", "host", "disk")
        self.recomputed_blocks: collections.Counter[str] = collections.Counter()

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Warm up (CUDA: compile kernels, capture graphs) and start the loop."""
        if self._loop_task is None:
            loop = asyncio.get_running_loop()
            started = time.monotonic()
            log.info("warming up%s", " (compiling kernels, capturing CUDA graphs)" if self.loaded.device.type == "cuda"
                     else "")
            await loop.run_in_executor(self._executor, self.runner.warmup, self.costs,
                                       self.config.max_num_batched_tokens)
            log.info("warmed up in %.1f s", time.monotonic() - started)
            if await self.store.measure_disk_read() is not None:
                log.info("measured: disk -> host %.2f GB/s", self.store.disk_read_rate / 1e9)
            self._loop_task = loop.create_task(self._run())

    async def stop(self, persist: bool = True, persist_s: float | None = None) -> None:
        """Abort every request, let a step in flight finish (it ends its aborted requests), stop
        the loop, write the cached blocks worth keeping (and every queued record) to the disk
        tier, and close the store. `persist_s`: the time choosing and queueing blocks to write
        may take (a supervisor's grace period); what did not fit is logged."""
        self.abort_all()
        self._stopping = True
        self._wakeup.set()
        if self._loop_task is not None:
            await self._loop_task
            self._loop_task = None
        try:
            if persist:
                started = time.monotonic()
                deadline = None if persist_s is None else started + persist_s
                written, left = self.store.persist(deadline)
                if written or left:
                    log.info("shutdown: %d cached blocks queued for the disk tier in %.1f s%s", written,
                             time.monotonic() - started,
                             f"; {left} left unwritten (the shutdown's time ran out: server.shutdown_timeout_s)"
                             if left else "")
            flushed = time.monotonic()
            await self.store.flush()
            if persist and written:
                log.info("shutdown: written to the disk tier in %.1f s", time.monotonic() - flushed)
        finally:        # whatever failed above, what reached the disk tier is kept
            self.store.close()
            self._executor.shutdown()
        if self.integrity_error is not None:
            raise self.integrity_error

    # ---- requests ---------------------------------------------------------------------------

    def submit(self, request: Request) -> RequestStream:
        """Validate and queue a request; raises InvalidRequest (and queues nothing). Its
        disk-resident prefix blocks start loading at once, from the last one back, while it
        waits and then while it computes the first ones (store/loader.py)."""
        request_id, params, priority = request.request_id, request.params, request.priority
        self._validate(request_id, request.prompt_ids, params, priority)
        if params.min_tokens:      # what min_tokens holds back: the stop tokens, and EOS unless ignored
            eos = () if params.ignore_eos else tuple(sorted(self.loaded.eos_token_ids))
            params = dataclasses.replace(params, end_ids=tuple(params.stop_token_ids) + eos)
        prompt = list(request.prompt_ids)
        # its cache: the namespace's (the tenant's, narrowed by its salt), after the public
        # prefix it starts with, if any
        keys = self.store.keys(request.cache_namespace, prompt)     # computed once, carried by the sequence
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=self.loaded.device)
            generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        match = self.store.match(keys, prompt, max_tokens=len(prompt) - 1)
        detokenizer = Detokenizer(self.loaded.tokenizer if self.detokenize else None, params.stop)
        retention = request.retention
        seq = Sequence(request_id, prompt, len(prompt), params, priority, next(self._arrivals), keys,
                       detokenizer, generator, found=match.tiers, max_tier=self.costs.slowest_tier_to_load(match.tiers),
                       tenant=request.namespace, retention=retention.blocks(len(prompt), self.config.block_size)
                       if retention is not None else None)
        seq.cache_report = self._cache_report(seq, match, request.cache_report,   # counted always, built if asked
                                              request.prompt_cache_key)
        self._requests[request_id] = seq
        self.scheduler.add(seq, match)
        self._wakeup.set()
        return RequestStream(self, seq)

    async def generate(self, prompt_ids: Seq[int], params: SamplingParams,
                       **fields) -> AsyncIterator[RequestOutput]:
        """The outputs of `Request(prompt_ids, params, **fields)`."""
        async for out in self.submit(Request(prompt_ids, params, **fields)):
            yield out

    def abort_all(self) -> None:
        for request_id in list(self._requests):
            self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Cancel a request at any point; a step in flight finishes it when it returns."""
        seq = self._requests.get(request_id)
        if seq is not None and not any(seq in step.seqs for step in self._in_flight):
            self._finish(seq, "abort")
        elif seq is not None:
            seq.finish_reason = "abort"

    def _validate(self, request_id: str, prompt: Seq[int], params: SamplingParams, priority: int) -> None:
        if request_id in self._requests:
            raise InvalidRequest(f"request id {request_id!r} is already running", "request_id")
        limits.check_request(self.bounds, prompt, params, priority)

    # ---- the loop ---------------------------------------------------------------------------
    #
    # With `engine.async_scheduling` (the default), each turn schedules and launches step N+1
    # while step N is still on the GPU, then reads N's tokens back and postprocesses it, so that
    # the CPU's part of a step (scheduling, inputs, outputs) overlaps the GPU's. At launch a
    # step counts as computed (`num_computed`) and a sequence it samples as one token longer
    # (`pending`); N+1 takes that token from N's sampled tensor on the device. What it must not
    # do, it cannot: a sequence whose pending token is certainly its last is not scheduled; one
    # preempted in flight is not admitted again until its token is back; a step with logits
    # processors (they read the tokens on the CPU) is read back before the next is scheduled. A
    # sequence that ends in N (EOS, a stop token) has computed one token in vain in N+1, which
    # its postprocessing drops. Blocks released while a step is in flight are safe to reuse:
    # on CUDA every later copy or kernel is queued behind it; on the CPU `launch` computes it.

    async def _run(self) -> None:
        while not self._stopping:
            try:
                if await self.step():
                    continue
                if self.config.check_integrity and self.integrity_error is None:
                    self.check_integrity()
            except Exception as e:  # a bug outside any one request's part: fail the step's requests
                if isinstance(e, AssertionError):     # a broken invariant: `stop` raises it again
                    self.integrity_error = self.integrity_error or e
                log.exception("engine step failed; failing the requests it held")
                # the steps in flight; none: schedule() itself failed, so all of them
                failed = {seq for step in self._in_flight for seq in step.seqs} or set(self._requests.values())
                self._in_flight, self._ahead = [], None
                for seq in failed:
                    if seq.status is not Status.FINISHED:
                        self._finish(seq, "error")
                if self._requests:
                    continue
            self._wakeup.clear()
            await self._wakeup.wait()
        if self._ahead is not None:
            ahead, self._ahead = self._ahead, None
            await self._complete(ahead)

    async def step(self) -> bool:
        """One turn: schedule and launch a step, then read back and postprocess the step
        launched before it (or, without async scheduling, this one). False if there was
        nothing to do."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and (ahead.launched is None or ahead.needs_tokens):
            await self._complete(ahead)        # the next step's inputs need its tokens on the CPU
            ahead, done = None, True
        else:
            done = ahead is not None
        plan = self.scheduler.schedule()
        for seq in plan.failed:
            self._finish(seq, "error")
        launched = await self._launch(plan.chunks, ahead) if plan.chunks else None
        if ahead is not None:
            await self._complete(ahead)
        if launched is not None and not self.config.async_scheduling:
            await self._complete(launched)
        else:
            self._ahead = launched
        if self.config.check_integrity:
            self.check_integrity()
        return done or bool(plan.chunks or plan.failed)

    async def _launch(self, chunks: list[Chunk], ahead: _Step | None) -> _Step:
        """Queue `chunks` on the device (their tokens are read back by `_complete`) and count them
        as computed. A step whose launch fails runs again chunk by chunk in `_complete`."""
        step = _Step(chunks, {c.seq for c in chunks}, any(c.samples and c.seq.params.processes for c in chunks))
        self._in_flight.append(step)                     # aborts wait for it
        try:
            inputs = self.runner.prepare(chunks, ahead.launched if ahead is not None else None)
            step.launched = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.runner.launch, inputs)
        except Exception:
            log.exception("launching a step of %d chunks failed", len(chunks))
        self.scheduler.advance(chunks)
        return step

    async def _complete(self, step: _Step) -> None:
        """Read a launched step's tokens back (or, if its launch failed, run its chunks one by
        one) and postprocess it."""
        loop = asyncio.get_running_loop()
        failed: set[Sequence] = set()
        logprobs: list[Logprob | None] = []
        if step.launched is None and len(step.chunks) == 1:     # the request at fault is known
            tokens, failed = [None] * step.chunks[0].samples, step.seqs
        elif step.launched is None:
            tokens, logprobs, failed = await self._one_by_one(step.chunks)
        else:
            try:
                if step.launched.done is None:            # computed already (CPU): nothing to wait for
                    tokens = self.runner.collect(step.launched)
                else:
                    tokens = await loop.run_in_executor(self._executor, self.runner.collect, step.launched)
                logprobs = step.launched.row_logprobs
            except Exception:
                log.exception("reading back a step of %d chunks failed; failing them", len(step.chunks))
                tokens, failed = [None] * sum(c.samples for c in step.chunks), step.seqs
            prefill = sum(c.num_tokens for c in step.chunks if c.num_tokens > 1)
            if step.launched.seconds is not None:
                self.costs.observe_prefill(prefill, step.launched.seconds)
        self._in_flight.remove(step)
        self._postprocess(step.chunks, tokens, failed, logprobs)

    async def _one_by_one(self, chunks: list[Chunk]) -> tuple[list[int | None], list[Logprob | None], set[Sequence]]:
        """Run each chunk of a step whose batched launch failed on its own (rewriting the same
        K/V slots), so that only the request at fault fails."""
        tokens: list[int | None] = []
        logprobs: list[Logprob | None] = []
        failed: set[Sequence] = set()
        loop = asyncio.get_running_loop()
        for c in chunks:
            try:
                if c.seq.status is Status.FINISHED:
                    raise RuntimeError("ended")          # nothing to run: its tokens are dropped
                launched = await loop.run_in_executor(self._executor, self.runner.launch, self.runner.prepare([c]))
                sampled = await loop.run_in_executor(self._executor, self.runner.collect, launched)
                tokens += sampled
                logprobs += launched.row_logprobs or [None] * len(sampled)     # aligned with `tokens`
            except Exception:
                if c.seq.status is not Status.FINISHED:
                    log.exception("the chunk of %s fails on its own; failing it", c.seq.request_id)
                failed.add(c.seq)
                tokens += [None] if c.samples else []
                logprobs += [None] if c.samples else []
        return tokens, logprobs, failed

    def _postprocess(self, chunks: list[Chunk], tokens: list[int | None], failed: set[Sequence],
                     logprobs: list[Logprob | None] | None = None) -> None:
        """Append each chunk's sampled token (and its logprobs, where asked), commit, stream."""
        sampled = iter(tokens)
        scored = iter(logprobs or ())
        for c in chunks:
            seq = c.seq
            token = next(sampled) if c.samples else None
            logprob = next(scored, None) if c.samples else None
            if c.samples:
                seq.pending -= 1
            if seq.status is Status.FINISHED:         # ended by the step before this one
                continue
            if seq.finish_reason == "abort":          # aborted while the step ran
                self._finish(seq, "abort")
            elif seq in failed or (c.samples and token is None):
                self._finish(seq, "error")
            else:
                try:
                    if token is not None:
                        seq.token_ids.append(token)
                    if seq.status is Status.RUNNING:  # not preempted since: its blocks are its own
                        self.store.commit(seq.request_id, seq.token_ids, c.start + c.num_tokens)
                    if token is not None:
                        self._emit(seq, token, logprob)
                except Exception:      # e.g. a tokenizer that cannot decode this output
                    log.exception("postprocessing %s failed; failing it", seq.request_id)
                    if seq.status is not Status.FINISHED:
                        self._finish(seq, "error")

    def _emit(self, seq: Sequence, token: int, logprob: Logprob | None = None) -> None:
        p = seq.params
        stop_token = token in p.stop_token_ids
        if stop_token:     # it ends the output; its text is not part of it (vLLM's rule)
            text, stopped = "", False
        else:
            text, stopped = seq.detokenizer.step(seq.token_ids, seq.prompt_len)
        reason = None
        if stopped or stop_token or (not p.ignore_eos and token in self.loaded.eos_token_ids):
            reason = "stop"
        elif seq.num_generated >= p.max_tokens or len(seq.token_ids) >= self.loaded.max_model_len:
            reason = "length"
        logprobs = [logprob] if logprob is not None else []
        if reason is None:
            self._deliver(seq, self._output(seq, [token], text, None, logprobs))
        else:
            self._finish(seq, reason, [token], text, logprobs)

    def _finish(self, seq: Sequence, reason: str, tokens: list[int] | None = None, text: str = "",
                logprobs: list[Logprob] | None = None) -> None:
        """The one exit: release the blocks, send the last delta."""
        self.scheduler.remove(seq)
        self._requests.pop(seq.request_id, None)
        seq.finish_reason = reason
        if seq.waited_for_prefix:            # a miss turned into a hit by waiting for another's compute
            self.miss_reasons["being_computed"] += 1
        loaded, recomputed = self._served(seq)
        if reason != "abort" and recomputed:     # found blocks it computed after all
            self.miss_reasons["recomputed"] += 1
            self.recomputed_blocks.update(recomputed)
        report = None if seq.cache_report is None else {
            **seq.cache_report, "loaded_blocks": loaded, "recomputed_blocks": sum(recomputed.values()),
            "waited_for_prefix": seq.waited_for_prefix}
        if reason != "stop":
            text += seq.detokenizer.flush()
        self._deliver(seq, self._output(seq, tokens or [], text, reason, logprobs or [], report))

    def _cache_report(self, seq: Sequence, match, asked: bool, prompt_cache_key: str = "") -> dict | None:
        """At arrival: count why `seq`'s prompt missed the cache in `miss_reasons` (/metrics);
        if `asked`, the report's first part: blocks found per tier, the first block missed and
        why, and the request's `prompt_cache_key` (recorded: one engine matches by tokens). What
        came of the blocks found is added at the end (`_served`)."""
        bs = self.config.block_size
        miss = self.store.first_miss(seq.token_ids, match, (seq.prompt_len - 1) // bs)
        if miss is not None:
            self.miss_reasons[miss["reason"]] += 1
            if self.multi_tenant and "at" in miss:    # when another tenant's burst evicted it: not theirs to see
                miss = {**miss, "at": None}
        if not asked:
            return None
        found = {t.name.lower(): match.tiers.count(t) for t in Tier}
        return {"prompt_blocks": (seq.prompt_len - 1) // bs, "found_blocks": found,
                "first_miss": miss, "load_or_recompute": {"mode": self.costs.mode, "rates": self.costs.rates(),
                                                          "loads_up_to": seq.max_tier.name.lower()},
                "model_fingerprint": self.loaded.fingerprint, "prompt_cache_key": prompt_cache_key or None}

    def _served(self, seq: Sequence) -> tuple[dict[str, int], dict[str, int]]:
        """What came of the blocks `seq` found at arrival, as it happened: the blocks served from
        each tier (those usage counts: found on the GPU, copied from host memory, read from disk)
        and, by the tier each was found in, the found blocks computed after all (the
        load-or-recompute choice, the front of a disk read, blocks evicted while it waited).
        Along a prefix tiers only get slower, and a block is served from the tier it was found
        in or a slower one (it moved down while it waited): the recomputed blocks are the last
        ones found, counted from the slowest tier up."""
        if seq.cached_tokens is None:        # never admitted
            return {t.name.lower(): 0 for t in Tier}, {}
        found = collections.Counter(t.name.lower() for t in seq.found)
        loaded = {t.name.lower(): n // self.config.block_size for t, n in seq.cached_tokens.items()}
        left = max(0, len(seq.found) - sum(loaded.values()))
        recomputed = {}
        for tier in ("disk", "host", "gpu"):
            recomputed[tier] = min(left, found[tier])
            left -= recomputed[tier]
        return loaded, {t: n for t, n in recomputed.items() if n}

    def _deliver(self, seq: Sequence, out: RequestOutput) -> None:
        if self._on_output is not None:
            self._on_output(out)
        else:
            seq.outputs.put_nowait(out)

    def _output(self, seq: Sequence, tokens: list[int], text: str, reason: str | None,
                logprobs: list[Logprob], report: dict | None = None) -> RequestOutput:
        cached = seq.cached_tokens or {t: 0 for t in Tier}
        return RequestOutput(seq.request_id, tokens, text, reason, seq.prompt_len, seq.num_generated,
                             dict(cached), seq.queued_s, logprobs if seq.params.logprobs is not None else None,
                             report)

    # ---- introspection ----------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Assert the engine's invariants, then the store's (nothing locked without an owner,
        every slot accounted): every live request is in exactly one scheduler queue, the store
        holds blocks for exactly the admitted ones, and every disk load belongs to a live
        request. Run after every step and when idle with
        `engine.check_integrity` (tests); cheap enough for them, not for production."""
        self.store.check_integrity()
        live = set(self._requests)
        running = {s.request_id for s in self.scheduler.running}
        waiting = self.scheduler.waiting_ids()
        assert running.isdisjoint(waiting) and running | waiting == live, \
            f"scheduler queues {sorted(running)} + {sorted(waiting)} != live requests {sorted(live)}"
        by_status = {st: {r for r, s in self._requests.items() if s.status is st} for st in Status}
        assert running == by_status[Status.RUNNING], "running queue != requests with status RUNNING"
        assert self.store.sequence_ids() == running, \
            f"store sequences {sorted(self.store.sequence_ids())} != running requests {sorted(running)}"
        assert self.store.load_ids() <= live, "a disk load without a live request"

    @property
    def bounds(self) -> limits.RequestBounds:
        return limits.RequestBounds(self.loaded.model.config.vocab_size, self.loaded.max_model_len,
                                    self.config.block_size, self.store.gpu.num_blocks,
                                    self.loaded.tokenizer is not None)

    @property
    def max_sequence_tokens(self) -> int:
        """The longest sequence (prompt + output) this engine can hold: the context length,
        or the whole GPU pool if that is smaller."""
        return min(self.loaded.max_model_len, self.store.gpu.num_blocks * self.config.block_size)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting


@dataclass(eq=False)
class _Step:
    """A launched step, until it is postprocessed."""
    chunks: list[Chunk]
    seqs: set[Sequence]
    needs_tokens: bool                 # a row with logits processors: read back before scheduling again
    launched: Launched | None = None   # None: its launch failed (`_complete` runs it chunk by chunk)
