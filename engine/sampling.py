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
    # logits processors (OpenAI's and vLLM's meanings); each off at its default
    presence_penalty: float = 0.0        # minus this for every token already in the output
    frequency_penalty: float = 0.0       # minus this times the token's count in the output
    repetition_penalty: float = 1.0      # tokens of the prompt and output: positive logits / it, negative * it
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, added to its logit)
    min_p: float = 0.0                   # sampling: drop tokens less likely than min_p * the likeliest
    min_tokens: int = 0                  # no EOS or stop token before this many output tokens
    end_ids: tuple[int, ...] = ()        # what min_tokens holds back: set by the engine (EOS + stop ids)
    logprobs: int | None = None          # each output token's logprob and this many most likely ones
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
        for name in ("presence_penalty", "frequency_penalty"):
            _check(_is_number(getattr(self, name)) and -2.0 <= getattr(self, name) <= 2.0, name, "a number in [-2, 2]")
        _check(_is_number(self.repetition_penalty) and 0.0 < self.repetition_penalty <= limits.REPETITION_PENALTY_MAX,
               "repetition_penalty", f"a number in (0, {limits.REPETITION_PENALTY_MAX:g}]")
        _check(_is_number(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p", "a number in [0, 1]")
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
               "an int in [0, max_tokens]")
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= limits.LOGPROBS_MAX),
               "logprobs", f"an int in [0, {limits.LOGPROBS_MAX}]")
        _check(len(self.logit_bias) <= limits.LOGIT_BIAS_MAX and all(
            _is_int(t) and 0 <= t <= limits.TOKEN_ID_MAX and _is_number(b) and -100 <= b <= 100
            for t, b in self.logit_bias), "logit_bias",
            f"at most {limits.LOGIT_BIAS_MAX} token ids with a bias in [-100, 100]")
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "logit_bias", tuple((t, float(b)) for t, b in self.logit_bias))
        object.__setattr__(self, "end_ids", tuple(self.end_ids))
        object.__setattr__(self, "greedy", self.temperature < limits.GREEDY_BELOW)

    @property
    def processes(self) -> bool:
        """Whether a logits processor is on (`process`: the row leaves the batched argmax, and
        needs the sequence's tokens). min_p is not one: it only narrows sampling (`_draw`)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.min_tokens)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and x == x   # not NaN


def _check(ok: bool, name: str, what: str) -> None:
    if not ok:
        raise InvalidRequest(f"{name} must be {what}", name)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           histories: list[tuple[list[int], int] | None] | None = None) -> list[int | None]:
    """One token per row; None for a row whose sampling failed (its request fails, no other).
    logits: [N, V]; params and generators: one per row; histories: per row, (token ids so far,
    prompt length) where its params have logits processors."""
    tokens, failed = sample_on_device(logits, params, generators, histories)
    out: list[int | None] = tokens.tolist()
    for i in failed:
        out[i] = None
    return out


def sample_on_device(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                     histories: list[tuple[list[int], int] | None] | None = None) -> tuple[torch.Tensor, list[int]]:
    """`sample` without waiting for the device: the tokens [N] on the logits' device, and the
    rows whose sampling failed. Greedy rows without processors take the argmax in the logits'
    own dtype (the same index as in fp32: the conversion is exact); other rows are written into
    the same tensor, so that reading them back is one copy."""
    tokens = logits.argmax(dim=-1)                      # [N]
    failed = []
    for i, (p, g) in enumerate(zip(params, generators)):
        if p.greedy and not p.processes:
            continue
        try:
            row = process(logits[i].float(), p, histories[i]) if p.processes else logits[i]
            tokens[i] = row.argmax() if p.greedy else _draw(row, p, g)
        except Exception:   # a bug, or a generator the device refuses: this row only
            log.exception("sampling failed for one row (temperature=%r top_p=%r top_k=%r)",
                          p.temperature, p.top_p, p.top_k)
            failed.append(i)
    return tokens, failed


def logprobs_on_device(logprobs: torch.Tensor, tokens: torch.Tensor,
                       k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logprobs: [R, V] log-softmax of R rows' logits; tokens: [R] the tokens sampled there.
    The sampled tokens' logprobs [R], and the `k` most likely tokens' logprobs and ids [R, k]."""
    top = logprobs.topk(k, dim=-1)
    return logprobs.gather(1, tokens[:, None])[:, 0], top.values, top.indices


def process(row: torch.Tensor, p: SamplingParams, history: tuple[list[int], int]) -> torch.Tensor:
    """The logits processors of `p` on one row (fp32 [V], modified in place): repetition
    penalty over prompt and output (transformers' RepetitionPenaltyLogitsProcessor), presence
    and frequency penalties over the output (OpenAI's), logit bias, and min_tokens (EOS and stop
    tokens held back, transformers' MinNewTokensLengthLogitsProcessor)."""
    token_ids, prompt_len = history
    vocab = row.numel()
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({t for t in token_ids if t < vocab}), dtype=torch.long, device=row.device)
        scores = row[seen]
        row[seen] = torch.where(scores > 0, scores / p.repetition_penalty, scores * p.repetition_penalty)
    if p.presence_penalty or p.frequency_penalty:
        out = [t for t in token_ids[prompt_len:] if t < vocab]
        if out:
            ids, counts = torch.tensor(out, dtype=torch.long).unique(return_counts=True)
            row[ids.to(row.device)] -= (p.presence_penalty + p.frequency_penalty * counts.float()).to(row.device)
    for t, bias in p.logit_bias:
        if t < vocab:
            row[t] += bias
    if len(token_ids) - prompt_len < p.min_tokens:
        held = [t for t in p.end_ids if t < vocab]
        if held:
            row[torch.tensor(held, dtype=torch.long, device=row.device)] = float("-inf")
    return row


def _draw(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits: [V] -> a 0-d token id, on the device, without waiting for it. Whatever the
    numbers, multinomial gets a valid distribution (a device-side assert would end the whole
    process's CUDA context): non-finite logits (a model's numeric fault) leave the argmax, and a
    top-p so small it rounds to 0 still keeps the most likely token."""
    scores = logits.float() / p.temperature
    if p.min_p:        # transformers' MinPLogitsWarper: relative to the likeliest token, after temperature
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
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
