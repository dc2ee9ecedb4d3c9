"""GGUF files as model paths: the format llama.cpp and Ollama users have on disk.

transformers reads a GGUF file (its `gguf_file=` argument, with the `gguf` package): the
architecture, the tokenizer and its chat template come from the file, the weights are
dequantized. Dequantizing takes a minute on a small CPU, so it happens once: the model is saved
as a model directory (float32 safetensors, the tokenizer beside it) under the user cache
directory, named by the file's digest, and every later start loads that directory like any
other — its KV fingerprint covers those weights (engine/fingerprint.py).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time

from engine.config import user_cache_dir

log = logging.getLogger("kvgate.engine")
DONE = "kvgate-converted"       # written last: a directory without it is an interrupted conversion


def cache_root() -> str:
    return os.path.join(user_cache_dir(), "kvgate", "models")


def converted_dir(gguf: str) -> str:
    """Where the model of GGUF file `gguf` is (or will be) kept as a model directory."""
    from engine.fingerprint import hash_file
    stem = os.path.basename(gguf).removesuffix(".gguf")
    return os.path.join(cache_root(), f"{stem}-{hash_file(gguf)[:16]}")


def is_converted(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, DONE))


def convert(gguf: str) -> str:
    """The model directory of GGUF file `gguf`, dequantizing it the first time. Raises
    ValueError naming model.path for a file transformers cannot read (truncated, an
    architecture or a quantization it does not know)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    target = converted_dir(gguf)
    if is_converted(target):
        return target
    log.warning("converting %s to a model directory (its first start: dequantizing the weights takes "
                "about a minute on a small CPU; later starts load %s)", os.path.basename(gguf), target)
    start = time.perf_counter()
    os.makedirs(cache_root(), exist_ok=True)
    work = tempfile.mkdtemp(prefix=".converting-", dir=cache_root())
    folder, name = os.path.split(os.path.abspath(gguf))
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model.hf_quantizer = None                     # the weights are dequantized: plain float32 now
        model.config.quantization_config = None
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
    except Exception as e:          # transformers raises many kinds for a file it cannot read
        shutil.rmtree(work, ignore_errors=True)
        raise ValueError(f"model.path: cannot read GGUF file {gguf!r}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    open(os.path.join(work, DONE), "w").close()
    try:
        os.rename(work, target)
    except OSError:                  # another process converted it meanwhile: keep theirs
        shutil.rmtree(work, ignore_errors=True)
    log.warning("converted %s in %.0f s", os.path.basename(gguf), time.perf_counter() - start)
    return target
