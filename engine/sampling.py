"""Sampling parameters and the sampler. Greedy when temperature is 0; otherwise temperature,
top-k and top-p, drawn from the request's own generator, so a seeded request gives the same
tokens whatever else shares its batch."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                       # 0 = no top-k
    seed: int | None = None              # None = a fresh random seed per request
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()           # stop strings; the output ends before the first one
    ignore_eos: bool = False
    greedy: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", "an int >= 1")
        _check(0.0 <= self.temperature <= 100.0, "temperature", "in [0, 100]")
        _check(0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "an int >= 0 (0 = off)")
        _check(self.seed is None or isinstance(self.seed, int), "seed", "an int")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "non-negative ints")
        _check(all(isinstance(s, str) and s for s in self.stop) and len(self.stop) <= 16, "stop",
               "at most 16 non-empty strings")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "greedy", self.temperature == 0.0)


def _check(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {what}")


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """One token per row. logits: [N, V]; params and generators: one per row. Greedy rows take
    the argmax in the logits' own dtype (the same index as in fp32: the conversion is exact)."""
    tokens = logits.argmax(dim=-1)
    for i, (p, g) in enumerate(zip(params, generators)):
        if not p.greedy:
            tokens[i] = _draw(logits[i].float() / p.temperature, p, g)
    return tokens.tolist()


def _draw(scores: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """scores: [V], already divided by the temperature."""
    if p.top_k and p.top_k < scores.numel():
        kth = torch.topk(scores, p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = sorted_scores.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= p.top_p
        scores = scores.scatter(0, order[drop], float("-inf"))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[0]
