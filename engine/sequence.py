"""A request's state inside the engine, and what it streams back."""
from __future__ import annotations

import asyncio
import dataclasses
import enum
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch

from engine.detokenizer import Detokenizer
from engine.sampling import SamplingParams
from store import BlockKeys, Tier


class Status(enum.Enum):
    WAITING = "waiting"      # not admitted (new, or preempted: its KV left in the cache)
    RUNNING = "running"      # admitted: blocks on the GPU
    FINISHED = "finished"


# an output token's logprob, and the most likely tokens' (token id, logprob) at its position
Logprob = tuple[float, list[tuple[int, float]]]


@dataclass(frozen=True)
class RequestOutput:
    """One streamed delta. `cached_tokens` counts prompt tokens served from the cache, by the
    slowest tier each block came through (a block read from disk counts as disk)."""
    request_id: str
    token_ids: list[int]                  # new tokens in this delta
    text: str                             # new text in this delta
    finish_reason: str | None             # None while running; "stop", "length" or "abort"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: dict[Tier, int]
    queued_s: float | None = None         # from submission to first admission (None until then)
    logprobs: list[Logprob] | None = None  # one per token of `token_ids`, if the request asked
    cache_report: dict | None = None       # on the last output, if the request asked

    @property
    def num_cached_tokens(self) -> int:
        return sum(self.cached_tokens.values())


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]              # the prompt, then every generated token
    prompt_len: int
    params: SamplingParams
    priority: int                     # higher = more urgent
    arrival: int                      # admission order among equal priorities
    keys: BlockKeys                   # its blocks' keys, in its scope: whose cache they are in (its
                                      # tenant's; public prefixes shared); computed once, as needed
    detokenizer: Detokenizer
    generator: torch.Generator | None
    found: tuple[Tier, ...] = ()      # where each prefix block was when the request arrived
    status: Status = Status.WAITING
    num_computed: int = 0             # tokens whose KV is in the cache, or written by a step launched
    pending: int = 0                  # tokens sampled by launched steps, not yet read back (at most 2)
    sample_row: int = 0               # its row among the tokens the last step launched for it samples
    preemptions: int = 0              # times it was preempted (it resumes from the cache)
    max_tier: Tier = Tier.HOST        # cached blocks in slower tiers are recomputed (engine/costs.py)
    read_due: float = 0.0             # time.monotonic() its disk read is due by (engine/scheduler.py)
    read_tokens: int = 0              # prompt tokens its disk read is to bring (not computed)
    cached_tokens: dict[Tier, int] | None = None   # set at first admission
    submitted_at: float = field(default_factory=time.monotonic)
    queued_s: float | None = None                  # submission to first admission
    finish_reason: str | None = None
    outputs: asyncio.Queue[RequestOutput] = field(default_factory=asyncio.Queue)
    tenant: str = ""                  # whose request (fair share between tenants: engine/fairness.py)
    cache_report: dict | None = None  # why its prompt hit or missed the cache, if asked (Engine._cache_report)
    waited_for_prefix: bool = False   # it waited for another request to compute its prefix
    retention: tuple[int, int, int, float] | None = None   # its prompt blocks' (first, end, priority, seconds)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_tokens(self) -> int:
        """Its length once the step in flight is read back: the known tokens and the pending one."""
        return len(self.token_ids) + self.pending

    def urgency(self) -> tuple[int, int]:
        """Sort key: most urgent first."""
        return (-self.priority, self.arrival)


async def coalesced(queue: asyncio.Queue[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """A request's deltas from `queue` until the last: one per step while the reader keeps up;
    a reader that falls behind (a busy event loop serving many streams) gets what piled up as
    one delta, which costs it one hop instead of one per token."""
    while True:
        out = await queue.get()
        while not queue.empty() and out.finish_reason is None:
            more = queue.get_nowait()
            out = dataclasses.replace(more, token_ids=out.token_ids + more.token_ids, text=out.text + more.text,
                                      logprobs=None if more.logprobs is None else (out.logprobs or []) + more.logprobs)
        yield out
        if out.finish_reason is not None:
            return


@dataclass(frozen=True)
class Retention:
    """Keep a request's prompt blocks (those wholly in tokens [start, end)) at `priority` in
    every tier for `seconds`, then let them fall back to their own priority (TensorRT-LLM's
    priority + duration per token range). The gateway bounds both by the tenant's config."""
    priority: int
    seconds: float
    start: int = 0
    end: int | None = None          # None: the prompt's end

    def blocks(self, prompt_len: int, block_size: int) -> tuple[int, int, int, float]:
        end = prompt_len if self.end is None else min(self.end, prompt_len)
        return -(-self.start // block_size), end // block_size, self.priority, self.seconds


class RequestStream:
    """The async iterator of one request's outputs. Leaving it early aborts the request:
    cancelling the task that reads it, `aclose()`, or `async with stream:` around the loop."""

    def __init__(self, engine, seq: Sequence) -> None:        # engine: engine.engine.Engine
        self._engine = engine
        self._seq = seq
        self.request_id = seq.request_id

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            async for out in coalesced(self._seq.outputs):
                yield out
        finally:
            await self.aclose()

    def close(self) -> None:
        """Abort the request unless it has ended."""
        if self._seq.status is not Status.FINISHED and self._seq.finish_reason is None:
            self._engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
