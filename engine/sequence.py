"""A request's state inside the engine, and what it streams back."""
from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

import torch

from engine.detokenizer import Detokenizer
from engine.sampling import SamplingParams
from store import Tier


class Status(enum.Enum):
    WAITING = "waiting"      # not admitted (new, or preempted: its KV left in the cache)
    RUNNING = "running"      # admitted: blocks on the GPU
    FINISHED = "finished"


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
    root: bytes                       # cache namespace (the tenant's root key)
    detokenizer: Detokenizer
    generator: torch.Generator | None
    found: tuple[Tier, ...] = ()      # where each prefix block was when the request arrived
    status: Status = Status.WAITING
    num_computed: int = 0             # tokens whose KV is in the cache
    preemptions: int = 0              # times it was preempted (it resumes from the cache)
    max_tier: Tier = Tier.HOST        # cached blocks in slower tiers are recomputed (engine/costs.py)
    cached_tokens: dict[Tier, int] | None = None   # set at first admission
    submitted_at: float = field(default_factory=time.monotonic)
    queued_s: float | None = None                  # submission to first admission
    prompt_keys: list[bytes] | None = None         # keys of the prompt's full blocks (the scheduler's)
    finish_reason: str | None = None
    outputs: asyncio.Queue[RequestOutput] = field(default_factory=asyncio.Queue)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    def urgency(self) -> tuple[int, int]:
        """Sort key: most urgent first."""
        return (-self.priority, self.arrival)
