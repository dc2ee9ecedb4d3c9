"""Bounds of every numeric request field, defined once: the gateway's request schema and the
engine's own validation (`SamplingParams`, `Engine.submit`) both read them, so a value the edge
lets through is one the engine runs, and one the engine refuses never reaches it unchecked.
"""
from __future__ import annotations

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


def generator_seed(seed: int, choice: int) -> int:
    """The generator seed of choice `choice` of a request seeded with `seed`: seed + choice,
    wrapped into torch's accepted range [0, GENERATOR_SEEDS)."""
    return (seed + choice) % GENERATOR_SEEDS
