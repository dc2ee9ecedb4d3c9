"""Model loading: a saved directory, a GGUF file, dummy weights, the built-in demo; the fingerprint.
Pinned to the CPU: the defaults (device, dtype) differ on a GPU machine."""
import os

import pytest
import torch

from engine import gguf as gguf_module
from engine.config import EngineConfig, ModelConfig, locate
from engine.fusion import fuse
from engine.model import load_model
from engine.request import Request
from tests.models import build_model_dir


def cpu(**kw) -> ModelConfig:
    return ModelConfig(**{"path": "builtin:tiny", "device": "cpu", **kw})


def test_builtin_demo_is_deterministic_and_chats(tmp_path):
    a = load_model(cpu(), block_size=16)
    b = load_model(cpu(), block_size=16)
    c = load_model(cpu(seed=1), block_size=16)
    assert a.name == "builtin:tiny" and a.dtype == torch.float32 and a.max_model_len == 4096
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    text = a.tokenizer.apply_chat_template([{"role": "system", "content": "be brief"},
                                            {"role": "user", "content": "héllo"}],
                                           add_generation_prompt=True, tokenize=False)
    assert text == "<|begin|><|system|>be brief<|end|><|user|>héllo<|end|><|assistant|>"
    ids = a.encode_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "héllo"}])
    assert a.tokenizer.decode(ids) == text and a.eos_token_ids == {a.tokenizer.eos_token_id}


def test_fingerprint_covers_block_size_dtype_and_weights(model_root):
    path = build_model_dir(model_root, "llama")
    base = load_model(cpu(path=path), block_size=4)
    assert load_model(cpu(path=path), block_size=4).fingerprint == base.fingerprint
    assert load_model(cpu(path=path), block_size=8).fingerprint != base.fingerprint
    assert load_model(cpu(path=path, dtype="bfloat16"), block_size=4).fingerprint != base.fingerprint
    other = build_model_dir(model_root, "llama", seed=1)    # same architecture, other weights
    assert load_model(cpu(path=other), block_size=4).fingerprint != base.fingerprint
    assert base.name == "llama-0" and base.block_layout(4).block_shape == (2, 2, 4, 2, 16)


def test_dummy_weights_from_a_named_shape_or_a_config():
    tiny = load_model(cpu(path="dummy:tiny"), block_size=16)
    assert tiny.tokenizer is None and tiny.model.config.num_hidden_layers == 4
    assert tiny.fingerprint == load_model(cpu(path="dummy:tiny"), block_size=16).fingerprint


@pytest.mark.parametrize("kw,message", [
    (dict(path="/no/such/dir"), "is not a directory"),
    (dict(path="builtin:huge"), "unknown built-in model"),
    (dict(path="dummy:nope"), "unknown dummy shape"),
    (dict(max_model_len=100_000), "exceeds the model's context"),
])
def test_load_errors_are_clear(kw, message):
    with pytest.raises(ValueError, match=message):
        load_model(cpu(**kw), block_size=16)


@pytest.mark.parametrize("kw,key", [
    (dict(dtype="float64"), "model.dtype"), (dict(load_format="gguf"), "model.load_format"),
    (dict(device="tpu"), "model.device"), (dict(max_model_len=-1), "model.max_model_len"),
])
def test_model_config_errors_name_the_key(kw, key):
    with pytest.raises(ValueError, match=key):
        cpu(**kw)


def _gguf(path, architecture: str = "llama") -> str:
    """A small GGUF file of `architecture` with one tensor: readable, but no model transformers knows."""
    import gguf
    import numpy as np
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_a_gguf_path_is_checked_before_anything_loads(tmp_path):
    """A directory with several GGUF files, a file that is not GGUF, a packaged model whose
    package is missing: refused by the configuration, naming model.path."""
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / name).write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"model.path .* holds 2 GGUF files \(a.gguf, b.gguf\): name one"):
        ModelConfig(path=str(tmp_path / "two"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="model.path .* is a file but not a .gguf file"):
        ModelConfig(path=str(tmp_path / "weights.bin"))
    (tmp_path / "one").mkdir()
    assert locate(_gguf(tmp_path / "one" / "m.gguf")) == ("gguf", str(tmp_path / "one" / "m.gguf"))
    assert locate(str(tmp_path / "one")) == ("gguf", str(tmp_path / "one" / "m.gguf"))   # the one it holds


@pytest.mark.parametrize("make,reason", [
    (lambda p: p.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 5), "cannot read GGUF file"),   # truncated
    (lambda p: _gguf(p, "mamba-of-the-future"), "cannot read GGUF file .* is not supported"),   # an architecture
])
def test_a_gguf_file_transformers_cannot_read_is_a_value_error_naming_model_path(tmp_path, make, reason):
    make(tmp_path / "m.gguf")
    with pytest.raises(ValueError, match=f"model.path: {reason}"):
        load_model(cpu(path=str(tmp_path / "m.gguf")), block_size=16)
    assert not [p for p in os.listdir(gguf_module.cache_root()) if p.startswith(".converting")]   # cleaned up


def test_engine_config_errors_name_the_key():
    with pytest.raises(ValueError, match="engine.max_num_seqs must be >= 0"):
        EngineConfig(max_num_seqs=-1)
    with pytest.raises(ValueError, match="engine.block_size must be >= 1"):
        EngineConfig(block_size=0)


def test_a_directory_without_weights_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="cannot load the model"):
        load_model(cpu(path=str(tmp_path)), block_size=16)


@pytest.mark.parametrize("arch,fused", [("llama", True), ("qwen2", True), ("mistral", True), ("gpt2", False)])
def test_llama_family_layers_are_fused_over_the_same_weights(model_root, arch, fused):
    """(That the fused layers compute what transformers computes is test_engine_correctness.)"""
    path = build_model_dir(model_root, arch)
    loaded = load_model(ModelConfig(path=path, device="cpu"), block_size=4)
    assert not any(hasattr(m, "ops") for m in loaded.model.modules())   # the engine fuses on CUDA only
    assert fuse(loaded.model, compiled=False) == (2 if fused else 0)
    layers = [m for m in loaded.model.modules() if hasattr(m, "ops")]
    assert bool(layers) == fused
    for layer in layers:
        attn = layer.self_attn
        assert attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()   # views, not copies
        assert attn.v_proj.weight.untyped_storage().data_ptr() == attn.qkv_weight.data_ptr()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():      # without kvgate's metadata a fused layer is transformers' own (the peer)
        plain = load_model(ModelConfig(path=path, device="cpu"), block_size=4).model
        plain.set_attn_implementation("sdpa")
        loaded.model.set_attn_implementation("sdpa")
        assert torch.allclose(loaded.model(ids).logits, plain(ids).logits, atol=1e-5)


async def test_the_demo_replies_in_printable_text(demo):
    """Only printable ASCII, newlines and the end token can be produced (the demo's generation
    config suppresses the rest, and the engine honours it as transformers' generate does)."""
    from engine.engine import Engine
    from engine.sampling import SamplingParams
    from store import StoreConfig
    engine = Engine(demo, EngineConfig(), StoreConfig(block_size=16, gpu_blocks=256))
    await engine.start()
    try:
        for i, question in enumerate(["Hi", "q", "Hello there, how are you?", "Once upon a time"]):
            ids = demo.encode_chat([{"role": "user", "content": question}])
            for params in (SamplingParams(max_tokens=48, temperature=0),
                           SamplingParams(max_tokens=48, temperature=1.0, seed=i)):
                text = "".join([o.text async for o in engine.submit(Request(ids, params))])
                assert all(c == "\n" or (c.isascii() and c.isprintable()) for c in text), repr(text)
    finally:
        await engine.stop(persist=False)
