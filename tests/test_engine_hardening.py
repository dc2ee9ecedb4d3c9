"""One request never fails another inside the engine: the sampler samples each row on its own,
a failing step is re-run chunk by chunk so only the request at fault fails, and admission or
postprocessing failures stay with their request. check_integrity can fail, and says so."""
import asyncio
import os

import pytest
import torch

from engine import limits
from engine.errors import InvalidRequest
from engine.request import Request
from engine.sampling import SamplingParams, sample
from store import Tier
from tests.engine_util import collect, greedy, make_engine, run
from tests.models import hf_greedy

POISON = 250          # a token id only the poisoned request's prompt holds


def test_each_row_is_sampled_on_its_own():
    """On CUDA too (KVGATE_TEST_DEVICE=cuda): no row's numbers trip a device-side assert."""
    device = os.environ.get("KVGATE_TEST_DEVICE", "cpu")
    logits = torch.randn(7, 300) * 30
    logits[5] = float("nan")                 # a model's numeric fault, in a sampled row
    logits[6, 7] = float("inf")
    logits = logits.to(device)
    params = [SamplingParams(temperature=1e-38), SamplingParams(temperature=0.7, top_p=1e-46),
              SamplingParams(temperature=2.0, top_k=2**31 - 1), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.9), SamplingParams(temperature=0.5), SamplingParams(temperature=1e-4)]

    class Broken:            # a generator the device refuses: that row fails, no other
        pass
    seeded = [torch.Generator(device=device).manual_seed(s) for s in (1, 2)]
    gens = [None, seeded[0], seeded[1], None, Broken(), None, None]
    tokens = sample(logits, params, gens)
    argmax = logits.argmax(-1).tolist()
    assert tokens[0] == argmax[0]            # below limits.GREEDY_BELOW: greedy
    assert tokens[1] == argmax[1]            # top_p that rounds to 0 keeps the most likely token
    assert 0 <= tokens[2] < 300 and tokens[3] == argmax[3]
    assert tokens[4] is None
    assert 0 <= tokens[5] < 300 and tokens[6] == 7   # non-finite scores: the argmax, no exception
    assert SamplingParams(temperature=limits.GREEDY_BELOW / 2).greedy
    assert not SamplingParams(temperature=limits.GREEDY_BELOW).greedy


@pytest.mark.parametrize("kw,param", [
    (dict(seed=2**64), "seed"), (dict(seed=-1), "seed"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=2**31), "top_k"), (dict(max_tokens=2**31), "max_tokens"), (dict(temperature=2.5), "temperature"),
])
def test_sampling_params_refuse_what_the_edge_refuses(kw, param):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**kw)
    assert e.value.param == param


async def test_a_priority_beyond_the_limits_is_refused_before_anything_is_queued(llama):
    engine = make_engine(llama)
    for priority in (limits.PRIORITY_MAX + 1, limits.PRIORITY_MIN - 1, 2**63):
        with pytest.raises(InvalidRequest) as e:
            engine.submit(Request([5, 6, 7], greedy(2), priority=priority))
        assert e.value.param == "priority"
    assert engine.num_waiting == 0
    with pytest.raises(ValueError, match="64 bits"):           # the store's own guard
        engine.store.admit("x", engine.store.root_key(), [5, 6, 7, 8, 9], priority=2**63)
    engine.store.check_integrity()
    assert engine.store.sequence_ids() == set()


async def test_a_failing_step_fails_only_the_request_at_fault(llama, monkeypatch):
    engine = make_engine(llama, max_seqs=8, max_batched=64)
    real, calls = engine.runner.launch, []

    def launch(step):
        calls.append(len(step.sample_rows))
        if POISON in step.input_ids.tolist():
            raise RuntimeError("injected: this request's input breaks the forward pass")
        return real(step)
    monkeypatch.setattr(engine.runner, "launch", launch)
    prompts = [[5, 6, 7, 8], [9, 10, 11], [POISON, 3, 4], [12, 13, 14, 15, 16]]
    streams = [engine.submit(Request(p, greedy(6))) for p in prompts]
    readers = [asyncio.create_task(collect(s)) for s in streams]
    while await engine.step():
        await asyncio.sleep(0)
    results = [await r for r in readers]
    assert [last.finish_reason for _, last in results] == ["length", "length", "error", "length"]
    for p, (tokens, _) in zip(prompts, results):
        if POISON not in p:
            assert tokens == hf_greedy(llama, p, 6)
    assert calls[:5] == [4, 1, 1, 1, 1]        # the batch, then each chunk alone
    assert engine.store.stats().tiers[Tier.GPU].locked == 0


async def assert_only_the_bad_one_fails(engine, llama, bad, good) -> None:
    """Step until idle: `bad` ends with an error, `good` (prompt [6, 7, 8]) exactly as alone."""
    readers = [asyncio.create_task(collect(s)) for s in (bad, good)]
    while await engine.step():
        await asyncio.sleep(0)
    (_, bad_last), (tokens, good_last) = [await r for r in readers]
    assert bad_last.finish_reason == "error" and good_last.finish_reason == "length"
    assert tokens == hf_greedy(llama, [6, 7, 8], 3)


async def test_an_admission_that_fails_fails_only_its_request(llama, monkeypatch):
    engine = make_engine(llama)
    real = engine.store.admit
    bad = engine.submit(Request([3, 4, 5], greedy(3)))

    def admit(seq_id, *a, **kw):
        if seq_id == bad.request_id:
            raise RuntimeError("injected admission bug")
        return real(seq_id, *a, **kw)
    monkeypatch.setattr(engine.store, "admit", admit)
    good = engine.submit(Request([6, 7, 8], greedy(3)))
    await assert_only_the_bad_one_fails(engine, llama, bad, good)


async def test_a_postprocessing_failure_fails_only_its_request(llama, monkeypatch):
    engine = make_engine(llama)
    bad = engine.submit(Request([3, 4, 5], greedy(3)))
    good = engine.submit(Request([6, 7, 8], greedy(3)))

    def broken(token_ids, start):
        raise UnicodeError("injected: a tokenizer that cannot decode this output")
    monkeypatch.setattr(bad._seq.detokenizer, "step", broken)
    await assert_only_the_bad_one_fails(engine, llama, bad, good)


async def test_check_integrity_fails_on_a_lock_without_an_owner_and_stop_reports_it(llama):
    engine = make_engine(llama)
    await engine.start()
    await run(engine, list(range(3, 20)), greedy(2))
    node = next(n for n in engine.store.index.nodes() if n.depth == 0)
    engine.store.index.lock([node])              # a lock nobody will release
    with pytest.raises(AssertionError, match="holders"):
        engine.check_integrity()
    _, last = await run(engine, [5, 6, 7], greedy(2))   # the loop's idle check trips on it
    with pytest.raises(AssertionError):
        await engine.stop()
