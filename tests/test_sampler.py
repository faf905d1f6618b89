"""Sampler: greedy, top-k/top-p masks, per-request seeds, penalties, pre-transform logprobs."""

import dataclasses
import math
import types

import pytest
import torch

from qwenvl.engine.sampler import Sampler, SampleRequest, apply_penalties, apply_top_k_top_p
from qwenvl.engine.sequence import SamplingParams
from qwenvl.engine.stopping import check_stop, check_stop_token, find_stop_string, held_back_chars

V = 50


def vars_of(p):
    return {f.name: getattr(p, f.name) for f in dataclasses.fields(p)}


def req(rid="r", prompt=(1, 2), output=(), **kw):
    toks = list(prompt) + list(output)
    return SampleRequest(rid, SamplingParams(**kw), toks, len(prompt))


def test_greedy():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    out = Sampler()(logits, [req(temperature=0)] * 3)
    assert out.token_ids == logits.argmax(-1).tolist() and out.logprobs == [None] * 3


def test_top_k_top_p_masks():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]] * 4))
    m = apply_top_k_top_p(logits, [2, 5, 5, 1], [1.0, 0.6, 0.7, 0.01])
    keep = torch.isfinite(m).tolist()
    assert keep[0] == [True, True, False, False, False]       # top-k 2
    assert keep[1] == [True, True, False, False, False]       # 0.5 < 0.6 so the 2nd is needed
    assert keep[2] == [True, True, False, False, False]       # 0.5 + 0.2 reaches 0.7
    assert keep[3] == [True, False, False, False, False]      # always at least one
    # kept logits are untouched, and unsorted inputs are scattered back correctly
    perm = torch.tensor([3, 0, 4, 1, 2])
    m2 = apply_top_k_top_p(logits[:1, perm], [3], [1.0])
    assert torch.isfinite(m2).tolist()[0] == [False, True, False, True, True]
    assert torch.equal(m2[0, 1], logits[0, 0])


def test_sampled_tokens_stay_inside_the_mask():
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(1))
    top3 = set(logits[0].topk(3).indices.tolist())
    s = Sampler()
    seen = {s(logits, [req(temperature=1.5, top_k=3)]).token_ids[0] for _ in range(60)}
    assert seen <= top3 and len(seen) > 1


def test_seed_reproducible_regardless_of_batch_company():
    g = torch.Generator().manual_seed(2)
    row = torch.randn(1, V, generator=g)
    others = torch.randn(3, V, generator=g)

    def draw(batch_logits, reqs, idx, steps=5):
        s = Sampler()
        return [s(batch_logits, reqs).token_ids[idx] for _ in range(steps)]

    alone = draw(row, [req("a", temperature=1.0, seed=7)], 0)
    company = [req("x", temperature=0.8), req("y", temperature=0, seed=3), req("a", temperature=1.0, seed=7),
               req("z", temperature=1.2, seed=9, top_p=0.5)]
    batch = torch.cat([others[:2], row, others[2:]])
    assert draw(batch, company, 2) == alone
    assert len(set(alone)) > 1                     # the generator advances between steps
    other_seed = draw(row, [req("a", temperature=1.0, seed=8)], 0, steps=20)
    assert other_seed != draw(row, [req("a", temperature=1.0, seed=7)], 0, steps=20)
    s = Sampler()
    s(row, [req("a", temperature=1.0, seed=7)])
    s.release("a")                                 # a fresh generator for a new request
    assert s(row, [req("a", temperature=1.0, seed=7)]).token_ids[0] == alone[0]


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    r = req(prompt=(0,), output=(1, 2, 2), repetition_penalty=2.0)
    assert apply_penalties(logits, [r]).tolist() == [[1.0, -4.0, 0.5, 0.5]]
    r = req(prompt=(0,), output=(1, 2, 2), presence_penalty=0.5)
    r.params = types.SimpleNamespace(**{**vars_of(r.params), "frequency_penalty": 0.25})   # optional field
    # prompt token 0 untouched; 1 seen once; 2 seen twice
    assert apply_penalties(logits, [r]).tolist() == [[2.0, -2.75, 0.0, 0.5]]
    # greedy with penalties: token 0 was repeated, so the penalty flips the choice
    r = req(prompt=(0,), temperature=0, repetition_penalty=4.0)
    assert Sampler()(logits, [r]).token_ids == [2]
    assert apply_penalties(logits, [req()]) is logits


def test_logprobs_are_raw_pre_transform():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0, 2.5]])
    raw = torch.log_softmax(logits, -1)[0]
    r = req(prompt=(0,), temperature=0.3, top_k=1, repetition_penalty=10.0, logprobs=2, seed=0)
    out = Sampler()(logits, [r])
    tok = out.token_ids[0]
    assert tok == 4                                 # the penalty on token 0 moved the choice
    lp = out.logprobs[0]
    assert set(lp) == {0, 4}                        # top-2 of the raw distribution (+ chosen, already in)
    assert math.isclose(lp[0], raw[0].item(), rel_tol=1e-6) and math.isclose(lp[4], raw[4].item(), rel_tol=1e-6)
    r0 = req(prompt=(5,), temperature=0, logprobs=0)
    out = Sampler()(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), [r0, req(temperature=0)])
    assert list(out.logprobs[0]) == [1] and out.logprobs[1] is None


def test_stopping_helpers():
    p = SamplingParams(max_tokens=3, stop_token_ids=[5], stop=["##"])
    assert check_stop_token(5, 1, p, eos_token_ids=[9]) == "stop"
    assert check_stop_token(9, 1, p, eos_token_ids=[9]) == "stop"
    assert check_stop_token(9, 1, SamplingParams(ignore_eos=True), eos_token_ids=[9]) is None
    assert check_stop_token(1, 3, p) == "length" and check_stop_token(1, 2, p) is None
    assert find_stop_string("abc##d", ["##", "c"]) == 2
    assert find_stop_string("ab##cd", ["##"], num_new_chars=1) is None
    assert find_stop_string("ab##", ["##"], num_new_chars=1) == 2
    assert held_back_chars("hello #", ["##"]) == 1 and held_back_chars("hello", ["##"]) == 0

    class S:
        params = p
        num_output_tokens = 1
    assert check_stop(S, 3, "hi ## there") == ("stop", "hi ")
    assert check_stop(S, 5, "hi") == ("stop", "hi")
    assert check_stop(S, 3, "hi") == (None, "hi")


def test_params_validation():
    for bad in [dict(temperature=-1), dict(top_p=0), dict(max_tokens=0), dict(repetition_penalty=0),
                dict(logprobs=-1)]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(stop="x").stop == ("x",)


def test_never_sample_ids_are_skipped_greedy_and_sampled_and_the_callers_logits_stay():
    logits = torch.zeros(2, V)
    logits[:, 7] = 30.0                                # the banned id dominates
    logits[:, 3] = 5.0
    before = logits.clone()
    s = Sampler(never_sample=[7, V + 10])              # an id past the vocabulary is ignored
    out = s(logits, [req("a", temperature=0, logprobs=1), req("b", temperature=1.0, seed=1)])
    assert out.token_ids[0] == 3 and out.token_ids[1] != 7
    assert torch.equal(logits, before)
    assert out.logprobs[0][7] > -1e-3                  # logprobs stay the model's own (pre-transform)


def test_min_tokens_masks_eos_and_stop_ids_until_reached_and_the_stop_helpers_wait_as_long():
    eos, stop_id = 9, 5
    logits = torch.zeros(4, V)
    logits[:, eos] = 30.0                               # eos dominates, then the stop id, then token 3
    logits[:, stop_id] = 20.0
    logits[:, 3] = 10.0
    before = logits.clone()
    rows = [req("short", output=(1,), temperature=0, min_tokens=2, stop_token_ids=[stop_id], logprobs=0),
            req("done", output=(1, 1), temperature=0, min_tokens=2, stop_token_ids=[stop_id]),
            req("ignores", output=(), temperature=0, min_tokens=1, ignore_eos=True),
            req("sampled", output=(), temperature=1.0, seed=3, min_tokens=4, stop_token_ids=[stop_id])]
    out = Sampler(eos_token_ids=[eos])(logits, rows)
    assert out.token_ids[:3] == [3, eos, eos]           # masked / min reached / eos is not a stop for it
    assert out.token_ids[3] not in (eos, stop_id)
    assert torch.equal(logits, before)
    assert out.logprobs[0][3] < -9                     # logprobs stay the model's own
    assert Sampler(eos_token_ids=[eos])(logits[:1], rows[1:2]).token_ids == [eos]

    p = SamplingParams(max_tokens=5, min_tokens=2, stop_token_ids=[stop_id], stop=["##"])
    assert check_stop_token(eos, 2, p, eos_token_ids=[eos]) is None    # within the first min_tokens
    assert check_stop_token(stop_id, 2, p) is None
    assert check_stop_token(eos, 3, p, eos_token_ids=[eos]) == "stop"
    assert check_stop_token(stop_id, 3, p) == "stop"

    class S:
        params = p
        num_output_tokens = 2
    assert check_stop(S, 1, "hi ## there") == (None, "hi ## there")
    S.num_output_tokens = 3
    assert check_stop(S, 1, "hi ## there") == ("stop", "hi ")


def test_min_tokens_validation():
    for bad in [dict(min_tokens=-1), dict(max_tokens=3, min_tokens=4)]:
        with pytest.raises(ValueError, match="min_tokens"):
            SamplingParams(**bad)
    assert SamplingParams(max_tokens=3, min_tokens=3).min_tokens == 3


def test_greedy_picks_the_first_of_equal_maxima_and_nan_as_argmax_does():
    """The sampler takes max(dim).indices (faster than argmax on a CPU): the same token as argmax on ties
    (many equal logits, a bfloat16 model's common case), -inf rows and NaN."""
    g = torch.Generator().manual_seed(5)
    for trial in range(50):
        logits = torch.randint(-2, 3, (6, V), generator=g).float()      # many ties
        logits[0] = float("-inf")
        if trial % 2:
            logits[1, 9] = logits[1, 4] = float("nan")
        logits[2, 11] = logits[2, 40] = 99.0
        out = Sampler()(logits, [req(temperature=0)] * 6)
        assert out.token_ids == logits.argmax(-1).tolist()
        assert out.token_ids[2] == 11


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_banned_ids_leave_the_callers_logits_alone_in_either_dtype(dtype):
    """The never-sample fill happens in place only on the sampler's own copy: a float32 caller's tensor (which
    .float() does not copy) stays as it was, with or without a penalty copying it first."""
    logits = torch.zeros(2, V, dtype=dtype)
    logits[:, 7] = 30.0
    logits[:, 3] = 5.0
    before = logits.clone()
    s = Sampler(never_sample=[7])
    for kw in ({}, {"repetition_penalty": 1.5}):
        out = s(logits, [req("a", temperature=0, **kw), req("b", temperature=0, **kw)])
        assert out.token_ids == [3, 3]
        assert torch.equal(logits, before)
