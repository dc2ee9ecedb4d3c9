"""The logits processors of SamplingParams against transformers' own on the CPU: repetition
penalty, min_p, min_tokens (min new tokens), logit bias (sequence bias of single tokens); the
presence and frequency penalties against OpenAI's formula; and each changing greedy output
through the engine."""
import pytest
import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from engine.errors import InvalidRequest
from engine.request import Request
from engine.sampling import SamplingParams, process, sample

V = 50
PROMPT = [3, 7, 7, 11]
OUTPUT = [7, 20, 20, 20, 4]


def logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 3


def test_repetition_penalty_is_transformers():
    p = SamplingParams(repetition_penalty=1.7)
    ours = process(logits().clone(), p, (PROMPT + OUTPUT, len(PROMPT)))
    theirs = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([PROMPT + OUTPUT]), logits()[None])[0]
    torch.testing.assert_close(ours, theirs)


def test_presence_and_frequency_penalties_are_openais_over_the_output_only():
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    ours = process(logits().clone(), p, (PROMPT + OUTPUT, len(PROMPT)))
    expected = logits().clone()
    for t in set(OUTPUT):                  # mu[j] - c[j] * alpha_frequency - (c[j] > 0) * alpha_presence
        expected[t] -= OUTPUT.count(t) * 0.25 + 0.5
    torch.testing.assert_close(ours, expected)
    assert ours[3] == logits()[3]          # a prompt token only: untouched


def test_logit_bias_is_a_single_token_sequence_bias():
    p = SamplingParams(logit_bias=((5, -100.0), (9, 7.5)))
    ours = process(logits().clone(), p, (PROMPT, len(PROMPT)))
    theirs = SequenceBiasLogitsProcessor({(5,): -100.0, (9,): 7.5})(torch.tensor([PROMPT]), logits()[None])[0]
    torch.testing.assert_close(ours, theirs)


def test_min_tokens_holds_back_the_end_tokens_like_min_new_tokens():
    p = SamplingParams(min_tokens=7, max_tokens=10, end_ids=(4, 9))
    history = (PROMPT + OUTPUT, len(PROMPT))                      # 5 generated: still held back
    ours = process(logits().clone(), p, history)
    theirs = MinNewTokensLengthLogitsProcessor(len(PROMPT), 7, [4, 9])(torch.tensor([PROMPT + OUTPUT]),
                                                                       logits()[None])[0]
    torch.testing.assert_close(ours, theirs)
    done = process(logits().clone(), p, (PROMPT + OUTPUT + [1, 2], len(PROMPT)))    # 7 generated
    torch.testing.assert_close(done, logits())


def test_min_p_keeps_what_transformers_keeps():
    row = logits(3)
    p = SamplingParams(min_p=0.2, temperature=0.7, seed=1)
    kept = {int(sample(row[None].clone(), [p], [torch.Generator().manual_seed(s)], [None])[0]) for s in range(300)}
    warped = MinPLogitsWarper(0.2)(torch.tensor([[0]]), (row / 0.7)[None])[0]
    allowed = set(torch.nonzero(warped > float("-inf")).flatten().tolist())
    assert kept <= allowed and len(allowed) < V        # only tokens transformers keeps are drawn


def test_greedy_rows_with_processors_leave_the_batched_argmax():
    rows = torch.stack([logits(0), logits(1)])
    plain, biased = SamplingParams(temperature=0), SamplingParams(temperature=0, logit_bias=((13, 100.0),))
    out = sample(rows.clone(), [plain, biased], [None, None], [None, (PROMPT, len(PROMPT))])
    assert out == [int(logits(0).argmax()), 13]


@pytest.mark.parametrize("kw,param", [({"presence_penalty": 2.5}, "presence_penalty"),
                                      ({"repetition_penalty": 0}, "repetition_penalty"),
                                      ({"min_p": 1.5}, "min_p"), ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
                                      ({"logit_bias": ((1, 101),)}, "logit_bias")])
def test_out_of_range_options_are_refused_by_name(kw, param):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**kw)
    assert e.value.param == param


@pytest.mark.parametrize("async_scheduling", [False, True])
async def test_logprobs_are_the_models_distribution_at_each_output_token(llama, async_scheduling):
    """Each output token's logprob and the top 3, against transformers' log-softmax of the
    same positions (before processors and temperature: a penalty changes the tokens chosen, not
    how the model scored them)."""
    from tests.engine_util import collect, make_engine
    from tests.models import _reference
    engine = make_engine(llama, async_scheduling=async_scheduling)
    await engine.start()
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=3, presence_penalty=0.5)
    stream = engine.submit(Request(PROMPT * 3, params))
    deltas = [out async for out in stream]
    plain = await collect(engine.submit(Request(PROMPT * 3, SamplingParams(max_tokens=2, temperature=0.0))))
    await engine.stop(persist=False)
    tokens = [t for d in deltas for t in d.token_ids]
    logprobs = [lp for d in deltas for lp in d.logprobs]
    assert len(logprobs) == len(tokens) == 5
    assert plain[1].logprobs is None                       # not asked: none sent
    with torch.no_grad():
        ref = _reference(llama)(torch.tensor([PROMPT * 3 + tokens])).logits[0].float().log_softmax(-1)
    for i, (token, (chosen, top)) in enumerate(zip(tokens, logprobs)):
        row = ref[len(PROMPT) * 3 + i - 1]
        assert chosen == pytest.approx(row[token].item(), abs=1e-4)
        assert [t for t, _ in top] == row.topk(3).indices.tolist()
        assert [lp for _, lp in top] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)


def test_logprobs_beyond_the_bound_are_refused():
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(logprobs=21)
    assert e.value.param == "logprobs"
