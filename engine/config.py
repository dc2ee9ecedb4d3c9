"""Frozen, validated configuration of the engine layer. Errors name the key and what is allowed."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class ModelConfig:
    path: str = "builtin:tiny"     # "builtin:tiny", "dummy:<shape>", or a local model directory
    load_format: str = "auto"      # "auto" (weights from `path`) or "dummy" (random weights)
    dtype: str = "auto"            # "auto" = bfloat16 on CUDA, float32 on CPU
    device: str = ""               # "" = cuda if available, else cpu
    max_model_len: int = 0         # 0 = the model's context length
    name: str = ""                 # served model name; "" = derived from `path`
    seed: int = 0                  # random weights (dummy, builtin) are a function of this
    fuse: bool = True              # fused, compiled decoder layers for the Llama family (on CUDA)

    def __post_init__(self) -> None:
        if not self.device:
            object.__setattr__(self, "device", _default_device())
        if self.dtype == "auto":
            object.__setattr__(self, "dtype", "bfloat16" if self.device.startswith("cuda") else "float32")
        _one_of("model.load_format", self.load_format, ("auto", "dummy"))
        _one_of("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        if not self.device.startswith(("cpu", "cuda")):
            raise ValueError(f"model.device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("model.device is 'cuda' but no CUDA GPU is available")
        if self.path.startswith("dummy:") and self.load_format != "dummy":
            object.__setattr__(self, "load_format", "dummy")
        if self.max_model_len < 0:
            raise ValueError(f"model.max_model_len must be >= 0, got {self.max_model_len}")


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64              # sequences in one step's batch
    max_num_batched_tokens: int = 2048  # tokens in one step (chunked prefill budget)
    block_size: int = 16
    load_or_recompute: str = "auto"     # "auto": per cache hit, whichever is faster; "load": always load
    check_integrity: bool = False       # assert every invariant after each step and when idle (tests)

    def __post_init__(self) -> None:
        for key in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"engine.{key} must be >= 1, got {getattr(self, key)}")
        _one_of("engine.load_or_recompute", self.load_or_recompute, ("auto", "load"))


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")
