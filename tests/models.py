"""Tiny models for engine tests: random weights from a config, saved with `save_pretrained`
(weights, config, tokenizer) and loaded back through kvgate's real loading code.

A larger init range than the default makes greedy decoding varied and its argmax margins wide,
so token-for-token comparisons with `transformers.generate` test something."""
from __future__ import annotations

import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from engine.demo import build_tokenizer

ARCHS = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, sliding_window=4096),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024),
}


def build_model_dir(root: str, arch: str, seed: int = 0, init: float = 0.2) -> str:
    path = os.path.join(root, f"{arch}-{seed}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    tokenizer = build_tokenizer()
    cfg = AutoConfig.for_model(arch, vocab_size=len(tokenizer), initializer_range=init,
                               max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                               **ARCHS[arch])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def hf_greedy(path: str, prompt: list[int], n: int) -> list[int]:
    """What transformers' own `generate` produces: the reference for every engine test."""
    model = _reference(path)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


_REFS: dict[str, torch.nn.Module] = {}


def _reference(path: str) -> torch.nn.Module:
    if path not in _REFS:
        _REFS[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                           attn_implementation="sdpa").eval()
    return _REFS[path]
