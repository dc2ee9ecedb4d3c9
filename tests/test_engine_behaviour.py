"""Engine behaviour: aborts free blocks, bad requests get clear errors and the engine keeps
serving, sampling options, priority, and a failing step does not stall the engine."""
import asyncio
import random

import pytest

from engine.errors import InvalidRequest
from engine.request import Request
from engine.sampling import SamplingParams
from store import Tier
from tests.engine_util import BS, collect, greedy, make_engine, run
from tests.models import hf_greedy


def assert_no_blocks_held(engine):
    engine.store.check_integrity()
    stats = engine.store.stats().tiers
    assert stats[Tier.GPU].locked == 0 and stats[Tier.HOST].locked == 0


async def test_randomized_run_with_aborts_keeps_integrity_after_every_step(llama):
    engine = make_engine(llama, gpu=40, host=16, max_batched=20, max_seqs=6)
    rng = random.Random(7)
    shared = [rng.randrange(3, 256) for _ in range(10)]
    streams = []
    for step in range(150):
        if rng.random() < 0.3:
            own = [rng.randrange(3, 256) for _ in range(rng.randrange(1, 25))]
            p = (shared if rng.random() < 0.5 else []) + own
            streams.append(engine.submit(Request(p, greedy(rng.randrange(1, 20)))))
        if streams and rng.random() < 0.1:
            engine.abort(rng.choice(streams).request_id)
        await engine.step()
        engine.store.check_integrity()
    while await engine.step():
        engine.store.check_integrity()
    assert engine.num_running == 0 and engine.num_waiting == 0
    assert_no_blocks_held(engine)
    finishes = [o.finish_reason for s in streams for o in [s._seq.outputs._queue[-1]]]
    assert "abort" in finishes and "length" in finishes


async def test_leaving_the_stream_aborts_and_frees_blocks(llama):
    engine = make_engine(llama)
    stream = engine.submit(Request(list(range(3, 30)), greedy(200)))
    async with stream:
        while (await engine.step()) and stream._seq.num_generated < 3:
            pass
        async for out in stream:
            break                                   # the caller stops reading
    await engine.step()                             # the step in flight ends it
    assert engine.num_running == 0 and not await engine.step()
    assert_no_blocks_held(engine)


async def test_cancelling_the_reader_aborts_even_mid_step(llama):
    engine = make_engine(llama)
    stream = engine.submit(Request(list(range(3, 30)), greedy(200)))
    reader = asyncio.create_task(collect(stream))   # a client that will disconnect
    for _ in range(4):
        await engine.step()
    step = asyncio.create_task(engine.step())       # a step is in flight...
    await asyncio.sleep(0)
    reader.cancel()                                 # ...when the client goes away
    await asyncio.gather(reader, return_exceptions=True)
    await step                                      # the step finishes the aborted request
    assert engine.num_running == 0
    while await engine.step():                      # (and one launched beside it is read back)
        pass
    assert_no_blocks_held(engine)


@pytest.mark.parametrize("prompt,params,param,code", [
    ([], greedy(4), "prompt", None),
    ([1, 2, 99999], greedy(4), "prompt", None),
    ([1, -2], greedy(4), "prompt", None),
    ([5] * 1000, greedy(100), "max_tokens", "context_length_exceeded"),
    ([1, 2, 3], greedy(10_000), "max_tokens", "context_length_exceeded"),
])
async def test_invalid_requests_are_rejected_and_the_engine_keeps_serving(llama, prompt, params, param, code):
    engine = make_engine(llama)
    await engine.start()
    with pytest.raises(InvalidRequest) as e:
        engine.submit(Request(prompt, params))
    assert e.value.param == param and e.value.code == code
    tokens, _ = await run(engine, [5, 6, 7], greedy(3))
    assert tokens == hf_greedy(llama, [5, 6, 7], 3)
    assert_no_blocks_held(engine)
    await engine.stop()


async def test_a_request_larger_than_the_gpu_pool_is_rejected(llama):
    engine = make_engine(llama, gpu=8)          # 32 tokens of KV
    with pytest.raises(InvalidRequest, match="needs 10 KV blocks; the GPU pool has 8"):
        engine.submit(Request(list(range(3, 20)), greedy(20)))   # 17 + 20 tokens


@pytest.mark.parametrize("kw,bad", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=-3), "top_k"),
    (dict(max_tokens=0), "max_tokens"), (dict(stop=("",)), "stop"),
    (dict(stop_token_ids=(-1,)), "stop_token_ids"),
])
def test_invalid_sampling_parameters(kw, bad):
    with pytest.raises(ValueError, match=bad):
        SamplingParams(**kw)


async def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(llama):
    engine = make_engine(llama)
    await engine.start()
    p = SamplingParams(max_tokens=16, temperature=1.5, top_p=0.9, seed=7, ignore_eos=True)
    alone, _ = await run(engine, [5, 6, 7], p)
    crowd = await asyncio.gather(run(engine, [9, 9], greedy(16)), run(engine, [5, 6, 7], p),
                                 run(engine, [8, 1, 2, 3], SamplingParams(max_tokens=16, seed=1)))
    assert crowd[1][0] == alone
    other, _ = await run(engine, [5, 6, 7], SamplingParams(max_tokens=16, temperature=1.5, top_p=0.9, seed=8,
                                                             ignore_eos=True))
    assert other != alone
    top1, _ = await run(engine, [5, 6, 7], SamplingParams(max_tokens=16, temperature=1.0, top_k=1,
                                                           ignore_eos=True))
    assert top1 == hf_greedy(llama, [5, 6, 7], 16)
    await engine.stop()


async def test_stop_strings_stop_tokens_and_eos(llama):
    engine = make_engine(llama)
    await engine.start()
    prompt = [5, 6, 7]
    full = [o async for o in engine.submit(Request(prompt, greedy(24)))]
    tokens = [t for o in full for t in o.token_ids]
    text = "".join(o.text for o in full)
    assert text == engine.loaded.tokenizer.decode(tokens, skip_special_tokens=True)
    stop = text[5:8]                                   # a piece of what it will say
    outs = [o async for o in engine.submit(Request(prompt, greedy(24, stop=(stop,))))]
    assert "".join(o.text for o in outs) == text[:text.index(stop)]
    assert outs[-1].finish_reason == "stop"
    toks, last = await run(engine, prompt, greedy(24, stop_token_ids=(tokens[6],)))
    assert toks == tokens[:tokens.index(tokens[6]) + 1] and last.finish_reason == "stop"
    outs = [o async for o in engine.submit(Request(prompt, greedy(24, stop_token_ids=(tokens[6],))))]
    end = tokens.index(tokens[6])             # the stop token's own text is not returned (vLLM's rule)
    assert "".join(o.text for o in outs) == engine.loaded.tokenizer.decode(tokens[:end], skip_special_tokens=True)
    engine.loaded.eos_token_ids = frozenset([tokens[4]])   # pretend that token is EOS
    toks, last = await run(engine, prompt, SamplingParams(max_tokens=24, temperature=0))
    assert toks == tokens[:tokens.index(tokens[4]) + 1] and last.finish_reason == "stop"
    toks, last = await run(engine, prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert toks == tokens and last.finish_reason == "length"
    await engine.stop()


async def test_priority_orders_the_waiting_queue(llama):
    engine = make_engine(llama, max_seqs=1)
    finished = []

    async def request(name, priority):
        await collect(engine.submit(Request([3, 4, 5], greedy(3), priority=priority)))
        finished.append(name)
    tasks = [asyncio.create_task(request(n, p)) for n, p in (("low1", 0), ("low2", 0), ("high", 5))]
    await asyncio.sleep(0)            # all three are queued before the engine starts
    await engine.start()
    await asyncio.gather(*tasks)
    assert finished == ["high", "low1", "low2"]
    await engine.stop()


async def test_an_urgent_request_preempts_a_less_urgent_one(llama):
    engine = make_engine(llama, gpu=14, host=32, max_batched=64)
    low_prompt = [(7 * i) % 250 + 3 for i in range(40)]
    low = engine.submit(Request(low_prompt, greedy(12), priority=0))
    low_out = asyncio.create_task(collect(low))
    while low._seq.num_generated < 2:
        await engine.step()
    assert engine.store.stats().tiers[Tier.GPU].locked == 11   # of 14: high needs 5
    high = engine.submit(Request(list(range(20, 40)), greedy(4), priority=10))
    high_out = asyncio.create_task(collect(high))
    while not high_out.done():
        await engine.step()
        await asyncio.sleep(0)
    assert engine.scheduler.num_preemptions == 1 and not low_out.done()  # high went first
    while await engine.step():
        await asyncio.sleep(0)
    assert (await low_out)[0] == hf_greedy(llama, low_prompt, 12)
    assert (await high_out)[0] == hf_greedy(llama, list(range(20, 40)), 4)
    assert_no_blocks_held(engine)


async def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(llama, monkeypatch):
    engine = make_engine(llama)
    real = engine.runner.launch
    calls = []

    def flaky(step):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected fault")
        return real(step)
    monkeypatch.setattr(engine.runner, "launch", flaky)
    await engine.start()
    _, last = await run(engine, [5, 6, 7], greedy(5))
    assert last.finish_reason == "error"
    assert_no_blocks_held(engine)
    tokens, last = await run(engine, [5, 6, 7], greedy(5))
    assert last.finish_reason == "length" and tokens == hf_greedy(llama, [5, 6, 7], 5)
    await engine.stop()


async def test_stop_ends_every_request_even_with_a_step_in_flight(llama):
    engine = make_engine(llama, gpu=128)
    await engine.start()
    streams = [engine.submit(Request(list(range(3, 40)), greedy(100))) for _ in range(3)]
    readers = [asyncio.create_task(collect(s)) for s in streams]
    while engine.num_running < 3 or not engine._in_flight:   # stop while a step runs
        await asyncio.sleep(0)
    await engine.stop(persist=False)
    for reader in readers:
        _, last = await reader                      # no reader is left waiting
        assert last.finish_reason == "abort"
    assert engine.num_running == 0 and engine.num_waiting == 0


async def test_requests_behind_a_prefix_being_computed_wait_for_it(llama):
    """Submitted together, requests sharing a new prefix compute it once: the first computes
    it, the others wait a step and then find it cached (output unchanged)."""
    engine = make_engine(llama, gpu=64, max_batched=64, max_seqs=8)
    shared = list(range(3, 3 + 6 * BS))
    other = list(range(100, 100 + 6 * BS))                  # another group, admitted meanwhile
    prompts = [shared + [200 + i] for i in range(3)] + [other + [7]]
    streams = [engine.submit(Request(p, greedy(3))) for p in prompts]
    assert await engine.step()
    first = {s.request_id for s in engine.scheduler.running}
    assert first == {streams[0].request_id, streams[3].request_id}   # the group's followers wait
    while await engine.step():
        pass
    results = [await collect(s) for s in streams]
    cached = [last.num_cached_tokens for _, last in results]
    assert cached == [0, 6 * BS, 6 * BS, 0]
    alone = make_engine(llama, gpu=64, max_batched=64, max_seqs=8)
    await alone.start()
    for p, (tokens, _) in zip(prompts, results):
        assert (await run(alone, p, greedy(3)))[0] == tokens
    await alone.stop()


async def test_a_reader_that_falls_behind_gets_the_backlog_as_one_delta(llama):
    engine = make_engine(llama)
    prompt = list(range(3, 20))
    stream = engine.submit(Request(prompt, greedy(6)))
    live, live_id = aiter(stream), stream.request_id
    deltas = []
    while await engine.step():                         # read as the tokens come: one per step
        if not engine._requests or engine._requests[live_id].outputs.qsize():
            deltas.append(await anext(live))
    late = engine.submit(Request(prompt, greedy(6)))
    while await engine.step():                         # nobody reads meanwhile
        pass
    backlog = [out async for out in late]
    assert [len(d.token_ids) for d in deltas] == [1] * 6
    assert len(backlog) == 1 and backlog[0].finish_reason == "length"
    assert backlog[0].token_ids == [t for d in deltas for t in d.token_ids]
    assert backlog[0].text == "".join(d.text for d in deltas)
