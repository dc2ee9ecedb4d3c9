"""The built-in demo model: a tiny Llama with a byte-level tokenizer and a chat template, built
offline and deterministic from a seed. Its weights are random, so its text is gibberish; it
exists so that kvgate runs out of the box and tests need no download."""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|begin|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|pad|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
DEMOS = {"builtin:tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens plus the special tokens; no merges, so any text round-trips exactly."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin|>", eos_token="<|end|>",
                                   pad_token="<|pad|>", chat_template=CHAT_TEMPLATE)


def build_demo(path: str, seed: int) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, str]:
    if path not in DEMOS:
        raise ValueError(f"unknown built-in model {path!r}; one of {sorted(DEMOS)}")
    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **DEMOS[path])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    # Random weights would mostly emit bytes that are not valid UTF-8 (an empty reply): only
    # printable ASCII and the end token keep their output rows, scaled up so that sampling
    # picks them too, and the demo prints readable gibberish.
    keep = [i for i in range(len(tokenizer))
            if i == tokenizer.eos_token_id or _printable(tokenizer.decode([i]))]
    mask = torch.zeros(len(tokenizer), 1)
    mask[keep] = 10.0
    with torch.no_grad():
        model.lm_head.weight.mul_(mask)
    # ... and the rest can never be chosen: a zeroed row's logit of 0 would still win whenever
    # every kept logit is negative (control characters and U+FFFD in the reply). transformers'
    # generate honours this too, so the demo still matches it token for token.
    kept = set(keep)
    model.generation_config.suppress_tokens = [i for i in range(len(tokenizer)) if i not in kept]
    return model, tokenizer, f"{path}:v2:seed={seed}"


def _printable(text: str) -> bool:
    return len(text) == 1 and text.isascii() and (text.isprintable() or text == "\n")
