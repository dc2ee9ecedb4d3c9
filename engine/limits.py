"""Bounds of every numeric request field, defined once: the gateway's request schema and the
engine's own validation (`SamplingParams`, `Engine.submit`) both read them, so a value the edge
lets through is one the engine runs, and one the engine refuses never reaches it unchecked.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1    # a 32-bit int; higher = more urgent
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1            # a 64-bit int, as vLLM takes it
TEMPERATURE_MAX = 2.0                               # OpenAI's range is [0, 2]
GREEDY_BELOW = 1e-5        # temperatures below this sample greedily (vLLM's rule): dividing
                           # logits by 1e-38 overflows float32, and the argmax is what it means
TOP_K_MAX = 2**31 - 1      # 0 = off; a top_k beyond the vocabulary keeps every token
N_MAX = 128                # choices per prompt (OpenAI's bound)
MAX_TOKENS_MAX = 2**31 - 1 # the context length bounds it further
STOP_MAX = 16              # stop strings per request
STOP_TOKEN_IDS_MAX = 1024
TOKEN_ID_MAX = 2**31 - 1   # token ids in prompts and stop_token_ids (the vocabulary bounds prompts)
GENERATOR_SEEDS = 2**64    # torch's generator seeds are [0, 2**64)
REPETITION_PENALTY_MAX = 10.0
LOGIT_BIAS_MAX = 300       # token ids in one request's logit_bias (OpenAI's bound)
RETENTION_MAX_S = 86400.0  # the longest retention a request may ask for without tenants (a tenant: its own)
TOOLS_MAX = 128            # tools offered in one request, tool calls in one message
LOGPROBS_MAX = 20          # most likely tokens returned per output token (OpenAI's chat bound)


def generator_seed(seed: int, choice: int) -> int:
    """The generator seed of choice `choice` of a request seeded with `seed`: seed + choice,
    wrapped into torch's accepted range [0, GENERATOR_SEEDS)."""
    return (seed + choice) % GENERATOR_SEEDS


@dataclass(frozen=True)
class RequestBounds:
    """What a request must fit, known once the engine has started: checked by the engine
    (`Engine.submit`) and, with the same code, by the API process before anything is sent to
    the engine process (gateway/app.py), so the client gets its 400 at once."""
    vocab_size: int
    max_model_len: int
    block_size: int
    gpu_blocks: int
    has_tokenizer: bool


def check_request(bounds: RequestBounds, prompt: Sequence, params, priority: int) -> None:
    """Raise InvalidRequest naming the field when the prompt, its sampling parameters (an
    engine.sampling.SamplingParams) or its priority do not fit `bounds`."""
    from engine.errors import InvalidRequest  # here: engine.sampling imports this module
    from engine.sampling import SamplingParams
    if not isinstance(priority, int) or not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise InvalidRequest(f"priority must be an int in [{PRIORITY_MIN}, {PRIORITY_MAX}]", "priority")
    if not isinstance(params, SamplingParams):
        raise InvalidRequest("params must be SamplingParams", "params")
    if not prompt:
        raise InvalidRequest("the prompt is empty", "prompt")
    if any(not isinstance(t, int) or not 0 <= t < bounds.vocab_size for t in prompt):
        raise InvalidRequest(f"prompt token ids must be ints in [0, {bounds.vocab_size})", "prompt")
    limit = bounds.max_model_len
    if len(prompt) + params.max_tokens > limit:
        raise InvalidRequest(f"this model's maximum context length is {limit} tokens; the prompt has "
                             f"{len(prompt)} and max_tokens is {params.max_tokens}", "max_tokens",
                             "context_length_exceeded")
    blocks = math.ceil((len(prompt) + params.max_tokens) / bounds.block_size)
    if blocks > bounds.gpu_blocks:
        raise InvalidRequest(f"the request needs {blocks} KV blocks; the GPU pool has {bounds.gpu_blocks}",
                             "max_tokens", "context_length_exceeded")
    if any(t >= bounds.vocab_size for t, _ in params.logit_bias):
        raise InvalidRequest(f"logit_bias token ids must be in [0, {bounds.vocab_size})", "logit_bias")
    if params.stop and not bounds.has_tokenizer:
        raise InvalidRequest("stop strings need a tokenizer; this model has none", "stop")
