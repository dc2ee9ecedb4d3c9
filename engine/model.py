"""Loading models: a local directory, a GGUF file (converted once: engine/gguf.py), a packaged
model (engine/config.py PACKAGED), random weights from a config ("dummy"), or the built-in tiny
demo model, which needs no download. Every load computes the model fingerprint that keys
the KV cache (engine/fingerprint.py): architecture config, every weight byte, dtype, block size
and KV layout version.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
)

from engine.attention import ATTN_IMPLEMENTATION
from engine.chat import ChatEncoder
from engine import gguf
from engine.config import PACKAGED, ModelConfig, locate
from engine.errors import InvalidRequest
from engine.fingerprint import fingerprint, weights_identity
from engine.fusion import fuse
from store import BlockLayout

SUPPORTED = ("llama", "qwen2", "mistral", "gpt2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Named architectures for load_format = "dummy" without a directory (benchmarks).
SHAPES = {
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(model_type="llama", hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                 max_position_embeddings=4096),
}


@dataclass
class Prompts:
    """What turns a request's text into token ids and back: the part of a model the API process
    needs (gateway/app.py), without the weights."""
    name: str
    tokenizer: object | None        # a transformers tokenizer; None for tokenizer-less dummies
    max_model_len: int
    chat: ChatEncoder | None = None   # None without a tokenizer or a chat template
    max_prompt_chars: int = 0         # a longer text cannot fit the context, whatever its tokens

    @classmethod
    def of(cls, name: str, tokenizer, max_model_len: int, chat_template: str = "") -> Prompts:
        """`chat_template`: a template file that replaces the tokenizer's own (`model.chat_template`)."""
        if chat_template:
            if tokenizer is None:
                raise ValueError("model.chat_template: this model has no tokenizer to apply it with")
            with open(chat_template, encoding="utf-8") as f:
                tokenizer.chat_template = f.read()
        chat = ChatEncoder(tokenizer) if getattr(tokenizer, "chat_template", None) else None
        # a token covers at most as many characters as its vocabulary string has; 4x covers
        # normalizers that shorten text (composing accents)
        max_chars = 4 * max_model_len * max(map(len, tokenizer.get_vocab())) if tokenizer is not None else 0
        return cls(name, tokenizer, max_model_len, chat, max_chars)

    def check_text_length(self, chars: int, param: str) -> None:
        """Refuse, before tokenizing it, text too long to fit the context in any tokenization."""
        if self.max_prompt_chars and chars > self.max_prompt_chars:
            raise InvalidRequest(f"the text is {chars} characters: more than this model's maximum context of "
                                 f"{self.max_model_len} tokens can hold", param, "context_length_exceeded")

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of `messages` (and the `tools` offered) rendered with the model's chat
        template, ready for the assistant's turn; special-token text inside a message stays
        plain text (engine/chat.py). Raises InvalidRequest."""
        if self.chat is None:
            raise InvalidRequest(f"model {self.name!r} has no chat template: use /v1/completions", "messages")
        return self.chat.encode(messages, tools)


@dataclass(kw_only=True)
class LoadedModel(Prompts):
    model: PreTrainedModel          # eval mode, on `device`, attention = kvgate's paged attention
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: frozenset[int]
    fingerprint: str

    def block_layout(self, block_size: int) -> BlockLayout:
        cfg = self.model.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return BlockLayout(num_layers=cfg.num_hidden_layers, block_size=block_size,
                           num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                           head_dim=head_dim, dtype=self.dtype)


def load_model(cfg: ModelConfig, block_size: int) -> LoadedModel:
    """Load the model `cfg` names. Raises ValueError with a clear message for what is wrong."""
    cfg = cfg.resolved()
    device = torch.device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    kind, where = locate(cfg.path)
    if kind == "builtin":
        from engine.demo import build_demo
        model, tokenizer, identity = build_demo(cfg.path, cfg.seed)
    elif cfg.load_format == "dummy":
        model, tokenizer, identity = _dummy(cfg, dtype, device)
    else:
        model, tokenizer, identity = _from_directory(gguf.convert(where) if kind == "gguf" else where, dtype)
    if model.config.model_type not in SUPPORTED:
        raise ValueError(f"model.path: model type {model.config.model_type!r} is not supported; one of {SUPPORTED}")
    model = model.to(device=device, dtype=dtype).eval()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if cfg.fuse and device.type == "cuda":
        fuse(model, compiled=True)
    context = _context_length(model.config)
    max_len = cfg.max_model_len or context
    if max_len > context:
        raise ValueError(f"model.max_model_len {max_len} exceeds the model's context of {context}")
    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos = eos if eos is not None else getattr(tokenizer, "eos_token_id", None)
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    fp = fingerprint(model.config, identity, dtype, block_size)
    prompts = Prompts.of(model_name(cfg), tokenizer, max_len, cfg.chat_template)
    return LoadedModel(**vars(prompts), model=model, device=device, dtype=dtype, eos_token_ids=eos_ids,
                       fingerprint=fp)


def model_name(cfg: ModelConfig) -> str:
    """The served model name: `model.name`, else the path's last part without ".gguf" (or the
    whole builtin:/dummy: or packaged name)."""
    if cfg.name:
        return cfg.name
    if cfg.path in PACKAGED or locate(cfg.path)[0] in ("builtin", "dummy"):
        return cfg.path
    return os.path.basename(os.path.normpath(cfg.path)).removesuffix(".gguf")


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer of the model `cfg` names, without its weights (None for a dummy shape or
    a directory without tokenizer files). Raises ValueError as load_model does."""
    if cfg.path.startswith("builtin:"):
        from engine.demo import DEMOS, build_tokenizer
        if cfg.path not in DEMOS:
            raise ValueError(f"unknown built-in model {cfg.path!r}; one of {sorted(DEMOS)}")
        return build_tokenizer()
    kind, where = locate(cfg.path)
    if kind == "gguf":          # from the converted directory once there is one, else the file
        converted = gguf.converted_dir(where)
        if gguf.is_converted(converted):
            return AutoTokenizer.from_pretrained(converted)
        try:
            return AutoTokenizer.from_pretrained(os.path.dirname(where), gguf_file=os.path.basename(where))
        except Exception as e:      # the engine process says what is wrong with the file
            raise ValueError(f"model.path: cannot read the tokenizer of GGUF file {where!r}: {e}") from None
    if kind == "dummy" or not _has_tokenizer(where):
        return None
    try:
        return AutoTokenizer.from_pretrained(where)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the tokenizer in {where!r}: {e}") from e


def _from_directory(path: str, dtype: torch.dtype):
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the model in {path!r}: {e}") from e
    return model, tokenizer, weights_identity(path)


def _dummy(cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
    """Random weights for the architecture of `dummy:<shape>` or of a directory's config.json."""
    if cfg.path.startswith("dummy:"):
        shape = cfg.path.removeprefix("dummy:")
        if shape not in SHAPES:
            raise ValueError(f"model.path: unknown dummy shape {shape!r}; one of {sorted(SHAPES)}")
        args = dict(SHAPES[shape])
        config = AutoConfig.for_model(args.pop("model_type"), **args)
        tokenizer = None
    else:
        config = AutoConfig.from_pretrained(cfg.path)
        tokenizer = load_tokenizer(cfg)
    with _seeded(cfg.seed), torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION)
    return model, tokenizer, f"dummy:seed={cfg.seed}:torch={torch.__version__}:device={device.type}"


def _has_tokenizer(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer.model"))


def _context_length(config) -> int:
    for key in ("max_position_embeddings", "n_positions"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ValueError("the model config gives no context length (max_position_embeddings)")


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
