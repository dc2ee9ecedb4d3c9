"""The model fingerprint changes whenever any weight byte does: two checkpoints that differ
only in a middle layer (same size, same first and last MiB) never share a KV block, also on one
disk directory. The digest is cached by file identity: a restart does not read the weights again."""
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from engine import fingerprint as fp_module
from engine.config import ModelConfig
from engine.demo import build_tokenizer
from engine.model import load_model
from store import Tier
from tests.engine_util import greedy, make_engine, run
from tests.models import hf_greedy

MIB = 1 << 20


def save_pair(root: str) -> tuple[str, str]:
    """Two 6-layer llamas of ~6 MB, identical but for layer 2's down projection."""
    tokenizer = build_tokenizer()
    cfg = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512,
                               num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=1024, initializer_range=0.2,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
    paths = [os.path.join(root, "first"), os.path.join(root, "second")]
    model.save_pretrained(paths[0])
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(-1.0)
    model.save_pretrained(paths[1])
    for p in paths:
        tokenizer.save_pretrained(p)
    return paths[0], paths[1]


def ends(path: str) -> tuple[int, bytes, bytes]:
    f = os.path.join(path, "model.safetensors")
    data = open(f, "rb").read()
    return len(data), data[:MIB], data[-MIB:]


def cpu(path: str) -> ModelConfig:
    return ModelConfig(path=path, device="cpu", dtype="float32")


async def test_models_differing_in_a_middle_layer_never_share_kv(tmp_path):
    first, second = save_pair(str(tmp_path))
    assert ends(first) == ends(second)      # what the old fingerprint hashed: identical
    assert load_model(cpu(first), 4).fingerprint != load_model(cpu(second), 4).fingerprint
    disk = str(tmp_path / "kv")
    prompts = [[(7 * i + j) % 250 + 3 for j in range(4 * 6 + 1)] for i in range(4)]
    one = make_engine(first, gpu=64, host=64, disk=disk, disk_blocks=400)
    await one.start()
    for p in prompts:
        await run(one, p, greedy(4))
    await one.stop()                        # persists its blocks to the shared directory
    two = make_engine(second, gpu=64, host=64, disk=disk, disk_blocks=400)
    await two.start()
    for p in prompts:
        tokens, last = await run(two, p, greedy(4))
        assert last.cached_tokens[Tier.DISK] == 0 and last.num_cached_tokens == 0
        assert tokens == hf_greedy(second, p, 4)
    await two.stop()


def test_the_digest_is_cached_by_file_identity(tmp_path, monkeypatch):
    first, _ = save_pair(str(tmp_path))
    hashed = []
    real = fp_module.hash_file
    monkeypatch.setattr(fp_module, "hash_file", lambda f: hashed.append(f) or real(f))
    base = load_model(cpu(first), 4).fingerprint
    assert len(hashed) == 1 and os.path.exists(os.path.join(first, fp_module.CACHE_NAME))
    assert load_model(cpu(first), 4).fingerprint == base and len(hashed) == 1   # from the cache
    weights = os.path.join(first, "model.safetensors")
    data = bytearray(open(weights, "rb").read())
    data[len(data) // 2] ^= 1                   # one bit, in place, same size
    st = os.stat(weights)
    with open(weights, "r+b") as f:
        f.write(data)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))   # even with the old mtime back
    assert load_model(cpu(first), 4).fingerprint != base and len(hashed) == 2


def test_the_cache_falls_back_to_the_user_cache_directory(tmp_path, monkeypatch):
    first, _ = save_pair(str(tmp_path))
    os.makedirs(os.path.join(first, fp_module.CACHE_NAME))   # the model directory takes no file there
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    base = load_model(cpu(first), 4).fingerprint
    cached = os.listdir(tmp_path / "xdg" / "kvgate")
    assert len(cached) == 1 and cached[0].startswith("weights-")
    monkeypatch.setattr(fp_module, "hash_file", lambda f: pytest.fail("hashed again"))
    assert load_model(cpu(first), 4).fingerprint == base
