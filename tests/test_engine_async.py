"""Async scheduling (engine/engine.py, "The loop"): step N+1 is scheduled and launched before
step N's tokens are read back. Its policies, pinned, and its output against one step at a time."""
import asyncio
import random

import pytest

from engine.request import Request
from engine.sampling import SamplingParams
from engine.sequence import Status
from tests.engine_util import BS, collect, greedy, make_engine, prompt
from tests.models import hf_greedy
from tests.test_engine_behaviour import assert_no_blocks_held


def record_launches(engine, monkeypatch) -> list[tuple[list[tuple[str, int, int]], bool]]:
    """Every step as it is prepared: its chunks (request id, start, tokens), and whether a step
    was still in flight to take pending tokens from."""
    launches, real = [], engine.runner.prepare

    def prepare(chunks, previous=None):
        launches.append(([(c.seq.request_id, c.start, c.num_tokens) for c in chunks], previous is not None))
        return real(chunks, previous)
    monkeypatch.setattr(engine.runner, "prepare", prepare)
    return launches


async def drive(engine) -> None:
    while await engine.step():
        await asyncio.sleep(0)


@pytest.mark.parametrize("async_scheduling", [False, True])
async def test_a_sequence_is_not_scheduled_once_its_last_token_is_in_flight(llama, async_scheduling, monkeypatch):
    engine = make_engine(llama, async_scheduling=async_scheduling)
    launches = record_launches(engine, monkeypatch)
    p = prompt(1, 9)
    stream = engine.submit(Request(p, greedy(4)))
    reader = asyncio.create_task(collect(stream))
    await drive(engine)
    tokens, last = await reader
    rid = stream.request_id
    assert [chunks for chunks, _ in launches] == [[(rid, 0, 9)], [(rid, 9, 1)], [(rid, 10, 1)], [(rid, 11, 1)]]
    # each decode step takes its input token from the step before it, on the device
    assert [previous for _, previous in launches] == [False] + [async_scheduling] * 3
    assert tokens == hf_greedy(llama, p, 4) and last.finish_reason == "length"
    assert_no_blocks_held(engine)


@pytest.mark.parametrize("async_scheduling,wasted", [(False, 0), (True, 1)])
async def test_an_end_on_a_stop_token_costs_one_dropped_row(llama, async_scheduling, wasted, monkeypatch):
    """The step after the stop token was launched before it was read: it computes one more row
    for the sequence, which postprocessing drops; nothing of it reaches the stream."""
    p = prompt(2, 9)
    expected = hf_greedy(llama, p, 3)
    engine = make_engine(llama, async_scheduling=async_scheduling)
    launches = record_launches(engine, monkeypatch)
    stream = engine.submit(Request(p, greedy(20, stop_token_ids=(expected[1],))))
    reader = asyncio.create_task(collect(stream))
    await drive(engine)
    tokens, last = await reader
    assert tokens == expected[:2] and last.finish_reason == "stop"
    assert len(launches) == 2 + wasted
    assert_no_blocks_held(engine)


async def test_a_step_with_logits_processors_is_read_back_before_the_next_is_scheduled(llama, monkeypatch):
    """A penalty reads the sequence's tokens on the CPU, so no step is left in flight for it."""
    p = prompt(3, 9)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, presence_penalty=1.5)
    outputs = []
    for async_scheduling in (True, False):
        engine = make_engine(llama, async_scheduling=async_scheduling)
        launches = record_launches(engine, monkeypatch)
        reader = asyncio.create_task(collect(engine.submit(Request(p, params))))
        await drive(engine)
        outputs.append((await reader)[0])
        assert len(launches) == 6 and not any(previous for _, previous in launches)
    assert outputs[0] == outputs[1]


async def test_a_sequence_preempted_in_flight_keeps_its_blocks_and_waits_for_its_token(llama, monkeypatch):
    """Preempted while its prompt's step is in flight: the blocks that step writes are indexed
    at once (readers queue behind it), and it is not admitted again until its token is back —
    then it resumes from those blocks and its output is unchanged."""
    engine = make_engine(llama, gpu=32)
    launches = record_launches(engine, monkeypatch)
    p = prompt(4, 3 * BS + 1)
    stream = engine.submit(Request(p, greedy(3)))
    reader = asyncio.create_task(collect(stream))
    seq = stream._seq
    assert await engine.step()                       # the prompt's step, left in flight
    assert seq.pending == 1 and not seq.num_generated
    engine.scheduler.preempt(seq)                    # as decode pressure would, while it is in flight
    assert len(engine.store.match(seq.keys, p).nodes) == 3      # its full blocks, indexed
    assert await engine.step()                       # its token comes back; it stays out
    assert len(launches) == 1 and seq.status is Status.WAITING and seq.num_generated == 1
    await drive(engine)
    tokens, last = await reader
    assert launches[1][0][0][1:] == (3 * BS, 2)      # resumed from its 3 cached blocks
    assert tokens == hf_greedy(llama, p, 3) and last.finish_reason == "length"
    assert_no_blocks_held(engine)


async def test_async_and_one_step_at_a_time_give_the_same_output_under_preemption(llama):
    """A mixed load on a pool too small for it (preemptions), with stop tokens, a penalty and
    lengths that end in different steps: every request's output and ending are the same either
    way, and nothing is left held."""
    rng = random.Random(11)
    prompts = [prompt(10 + i, rng.randrange(5, 20)) for i in range(8)]
    lengths = [rng.randrange(3, 12) for _ in prompts]
    params = [greedy(n) for n in lengths]
    params[1] = greedy(lengths[1], stop_token_ids=(hf_greedy(llama, prompts[1], 3)[2],))
    params[4] = SamplingParams(max_tokens=lengths[4], temperature=0.0, ignore_eos=True, frequency_penalty=1.0)
    results, preemptions = [], []
    for async_scheduling in (True, False):
        engine = make_engine(llama, gpu=14, host=32, max_batched=16, max_seqs=6, async_scheduling=async_scheduling)
        await engine.start()
        runs = await asyncio.gather(*(collect(engine.submit(Request(p, q))) for p, q in zip(prompts, params)))
        results.append([(tokens, last.finish_reason) for tokens, last in runs])
        preemptions.append(engine.scheduler.num_preemptions)
        assert_no_blocks_held(engine)
        await engine.stop(persist=False)
    assert results[0] == results[1]
    assert min(preemptions) > 0                      # the pool was too small: preemption ran
    for i in (0, 2, 3, 5, 6, 7):
        assert results[0][i] == (hf_greedy(llama, prompts[i], lengths[i]), "length")
    assert results[0][1] == (hf_greedy(llama, prompts[1], 3), "stop")
