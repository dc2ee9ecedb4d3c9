"""Sampling parameters and the sampler. Greedy when temperature is (nearly) 0; otherwise
temperature, top-k and top-p, drawn from the request's own generator, so a seeded request gives
the same tokens whatever else shares its batch. A row is sampled on its own: whatever its
numbers, it can never fail the rows beside it."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from engine import limits
from engine.errors import InvalidRequest

log = logging.getLogger("kvgate.engine")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                       # 0 = no top-k
    seed: int | None = None              # generator seed; None = a fresh random seed per request
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()           # stop strings; the output ends before the first one
    ignore_eos: bool = False
    greedy: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        """Raises InvalidRequest naming the field (limits in engine/limits.py)."""
        _check(_is_int(self.max_tokens) and 1 <= self.max_tokens <= limits.MAX_TOKENS_MAX, "max_tokens",
               f"an int in [1, {limits.MAX_TOKENS_MAX}]")
        _check(_is_number(self.temperature) and 0.0 <= self.temperature <= limits.TEMPERATURE_MAX,
               "temperature", f"a number in [0, {limits.TEMPERATURE_MAX:g}]")
        _check(_is_number(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "a number in (0, 1]")
        _check(_is_int(self.top_k) and 0 <= self.top_k <= limits.TOP_K_MAX, "top_k",
               f"an int in [0, {limits.TOP_K_MAX}] (0 = off)")
        _check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < limits.GENERATOR_SEEDS), "seed",
               "an int in [0, 2**64)")
        _check(len(self.stop_token_ids) <= limits.STOP_TOKEN_IDS_MAX
               and all(_is_int(t) and 0 <= t <= limits.TOKEN_ID_MAX for t in self.stop_token_ids), "stop_token_ids",
               f"at most {limits.STOP_TOKEN_IDS_MAX} non-negative ints")
        _check(all(isinstance(s, str) and s for s in self.stop) and len(self.stop) <= limits.STOP_MAX,
               "stop", f"at most {limits.STOP_MAX} non-empty strings")
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "greedy", self.temperature < limits.GREEDY_BELOW)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and x == x   # not NaN


def _check(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise InvalidRequest(f"{name} must be {what}", name)


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int | None]:
    """One token per row; None for a row whose sampling failed (its request fails, no other).
    logits: [N, V]; params and generators: one per row. Greedy rows take the argmax in the
    logits' own dtype (the same index as in fp32: the conversion is exact). Sampled rows are
    written into the same tensor, so the step waits for the device once, not once per row."""
    tokens = logits.argmax(dim=-1)                      # [N]
    failed = []
    for i, (p, g) in enumerate(zip(params, generators)):
        if not p.greedy:
            try:
                tokens[i] = _draw(logits[i], p, g)
            except Exception:   # a bug, or a generator the device refuses: this row only
                log.exception("sampling failed for one row (temperature=%r top_p=%r top_k=%r)",
                              p.temperature, p.top_p, p.top_k)
                failed.append(i)
    out: list[int | None] = tokens.tolist()
    for i in failed:
        out[i] = None
    return out


def _draw(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits: [V] -> a 0-d token id, on the device, without waiting for it. Whatever the
    numbers, multinomial gets a valid distribution (a device-side assert would end the whole
    process's CUDA context): non-finite logits (a model's numeric fault) leave the argmax, and a
    top-p so small it rounds to 0 still keeps the most likely token."""
    scores = logits.float() / p.temperature
    if p.top_k and p.top_k < scores.numel():
        kth = torch.topk(scores, p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = sorted_scores.softmax(-1)
        # drop a token when the tokens before it already reach top_p; the first always stays
        drop = probs.cumsum(-1) - probs >= p.top_p
        drop[0] = False
        scores = torch.empty_like(scores).scatter_(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = scores.softmax(-1)     # all NaN if a score overflowed to +inf or none is finite
    argmax = torch.zeros_like(probs).scatter_(0, logits.argmax().view(1), 1.0)
    return torch.multinomial(torch.where(probs.isfinite().all(), probs, argmax), 1, generator=generator)[0]
