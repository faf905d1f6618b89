"""The scorers against the official definitions' edge cases (DocVQA, ChartQA, TextVQA, VLMEvalKit
letter inference, MMMU, MathVista, MMBench circular)."""

import random

import pytest

from qwenvl.evaluation.metrics.anls import anls, levenshtein
from qwenvl.evaluation.metrics.choice import infer_choice, letters_for
from qwenvl.evaluation.metrics.mathvista import extract_answer, mathvista_score
from qwenvl.evaluation.metrics.mmmu import mmmu_score, open_gold, parse_open_response
from qwenvl.evaluation.metrics.relaxed import relaxed_accuracy
from qwenvl.evaluation.metrics.vqa import normalize_answer, vqa_accuracy
from qwenvl.evaluation.score import score_records


# ---- DocVQA ANLS -------------------------------------------------------------------------------
def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3


def test_anls_normalises_for_distance_only():
    assert anls("  Hello   WORLD ", ["hello world"]) == 1.0
    # distance on "ac" vs "ab" = 1, but the denominator is the RAW length 5 ("ac   "): 1 - 1/5
    assert anls("ac   ", ["ab"]) == pytest.approx(0.8)


def test_anls_threshold_keeps_exactly_half():
    assert anls("ac", ["ab"]) == 0.5
    assert anls("axy", ["abc"]) == 0.0  # 1 - 2/3 < 0.5


def test_anls_upper_length_quirk():
    # 'ß'.upper() == 'SS': the script's length of "ßß" is 4, so 1 - 1/4 (len() would give 0.5)
    assert anls("ßx", ["ßß"]) == pytest.approx(0.75)


def test_anls_max_over_answers_and_empty():
    assert anls("blue", ["red", "blue"]) == 1.0
    assert anls("", [""]) == 1.0


# ---- ChartQA relaxed accuracy -----------------------------------------------------------------
@pytest.mark.parametrize("pred,gold,ok", [
    ("104", "100", 1), ("106", "100", 0), ("105", "100", 1),
    ("100", "95", 0),        # tolerance is relative to the gold: 5/95 > 5%
    ("95", "100", 1),
    ("12%", "0.12", 1), ("12", "0.12", 0), ("12%", "12", 0),
    ("1,000", "1000", 0), ("0.0", "0", 0), ("0", "0", 1),
    ("Yes", "yes", 1), (" yes", "yes", 0), ("yes ", "yes", 0),
])
def test_relaxed_accuracy(pred, gold, ok):
    assert relaxed_accuracy(pred, [gold]) == ok


def test_relaxed_accuracy_max_over_answers():
    assert relaxed_accuracy("7", ["3", "7.2"]) == 1.0


# ---- TextVQA ----------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,norm", [
    ("Two", "2"), ("the cat.", "cat"), ("dont", "don't"), ("coca-cola", "coca cola"),
    ("3.5", "3.5"), ("Yes!", "yes"), ("an apple", "apple"), ("ten", "10"), ("none", "0"),
    ("its", "its"), ("whats up?", "what's up"), ("1,000", "1000"), ("a - b", "b"),
    ("john's", "john 's"), ("Hello\tWorld", "hello world"),
])
def test_vqa_normalisation(raw, norm):
    assert normalize_answer(raw) == norm


def test_vqa_leave_one_out():
    gts = ["two"] * 3 + ["three"] * 7
    assert vqa_accuracy("2", gts) == pytest.approx(0.9)        # (3 * 2/3 + 7 * 1) / 10
    assert vqa_accuracy("three", gts) == 1.0
    assert vqa_accuracy("four", gts) == 0.0
    one = ["a dog"] + ["cat"] * 9
    assert vqa_accuracy("dog", one) == pytest.approx(0.3)      # (1 * 0 + 9 * 1/3) / 10
    two = ["dog"] * 2 + ["cat"] * 8
    assert vqa_accuracy("Dog.", two) == pytest.approx(0.6)     # (2 * 1/3 + 8 * 2/3) / 10


# ---- letter inference (AI2D, MMBench) ---------------------------------------------------------
OPTS = letters_for(["cat", "dog", "bird", "fish"])


@pytest.mark.parametrize("pred,letter", [
    ("B", "B"), ("(C)", "C"), ("The answer is B.", "B"), ("B. dog", "B"),
    ("**D**", "D"),
    ("B is right because the animal in the picture barks loudly", None),   # not in the last four
    ("A or B", None),                                                    # two letters
    ("the answer is a dog", "A"),        # "answer is X" has no word boundary
    ("I believe the answer is c", "C"),
    ("It is a dog", "B"),                # option text, short enough
    ("it is a dog and not a dog-like cat", None),  # too long (> 2x option texts) and two texts
    ("Clearly this animal is a dog, I am sure of it", None),  # 45 chars > 2 * 14
    ("cat or dog", None),
    ("Z", None), ("Cannot determine the answer", None),
    ("", None),
])
def test_infer_choice(pred, letter):
    assert infer_choice(pred, OPTS) == letter


def test_infer_choice_dict_options():
    assert infer_choice("选C", {"A": "红色", "B": "蓝色", "C": "绿色"}) is None  # "选C" is one token
    assert infer_choice("答案是 C", {"A": "红色", "B": "蓝色", "C": "绿色"}) == "C"
    assert infer_choice("绿色", {"A": "红色", "B": "蓝色", "C": "绿色"}) == "C"


# ---- MMMU -------------------------------------------------------------------------------------
def _mc(pred, answer="B", options=("1", "2", "3", "4")):
    return {"prediction": pred, "question_type": "multiple-choice", "options": list(options), "answer": answer}


@pytest.mark.parametrize("pred,ok", [
    ("B", 1), ("(B)", 1), ("The answer is (B).", 1), ("(A) is wrong, (B) is right", 1),
    ("A B", 1),   # the last one wins
    ("B A", 0),
    ("The correct value among those given is clearly 2 here", 1),  # option text, > 5 tokens
])
def test_mmmu_multiple_choice(pred, ok):
    assert mmmu_score(_mc(pred), random.Random(0)) == ok


def test_mmmu_random_fallback_seed_42_in_record_order():
    recs = [dict(_mc("no idea", answer=a), benchmark="mmmu", id=i) for i, a in enumerate("ABCDABCDAB")]
    rows, summary = score_records(recs)
    rng = random.Random(42)
    expected = [float(rng.choice(["A", "B", "C", "D"]) == r["answer"]) for r in recs]
    assert [r["score"] for r in rows] == expected


def test_mmmu_open():
    assert open_gold("['24/7', '3.429']") == ["24/7", "3.429"]
    assert open_gold("[oops") == "[oops"
    gold = "['24/7', '3.429']"
    assert mmmu_score({"prediction": "So the answer is 24/7", "question_type": "open", "answer": gold}, None) == 1
    assert mmmu_score({"prediction": "The result is 3.4291", "question_type": "open", "answer": gold}, None) == 1
    assert mmmu_score({"prediction": "The result is 3.44", "question_type": "open", "answer": gold}, None) == 0
    assert mmmu_score({"prediction": "1,200 apples", "question_type": "open", "answer": "1200"}, None) == 1
    assert mmmu_score({"prediction": "it is bob", "question_type": "open", "answer": "b"}, None) == 0  # " b"/"b "
    assert mmmu_score({"prediction": "Paris", "question_type": "open", "answer": ["paris", "Lyon"]}, None) == 1
    # "=" is a key indicator on the last line only
    assert set(parse_open_response("x = 5\nso it is 6.")) == {6.0}
    assert set(parse_open_response("so it is 6\nx = 5")) == {5.0, 6.0}


# ---- MathVista --------------------------------------------------------------------------------
def _mv(**kw):
    base = {"question_type": "free_form", "answer_type": "integer", "choices": None, "precision": None}
    base.update(kw)
    return base


def test_mathvista_normalisation():
    mc = dict(question_type="multi_choice", answer_type="text", choices=["5", "10", "15"], answer="10")
    assert mathvista_score(_mv(prediction="", extraction="(B) ten", **mc))[0] == 1
    assert mathvista_score(_mv(prediction="", extraction="B", **mc))[0] == 1
    assert mathvista_score(_mv(prediction="", extraction="11", **mc))[0] == 1  # closest choice
    assert mathvista_score(_mv(prediction="", extraction="3.7", answer="3"))[0] == 1  # int()
    fl = dict(answer_type="float", answer="1.46")
    assert mathvista_score(_mv(prediction="", extraction="1.456", precision=2.0, **fl))[0] == 1
    assert mathvista_score(_mv(prediction="", extraction="1.456", precision=1, **fl))[0] == 0
    assert mathvista_score(_mv(prediction="", extraction="abc", answer="3"))[0] == 0
    lst = dict(answer_type="list", answer="[1, 2]")
    assert mathvista_score(_mv(prediction="", extraction=[1, 2], **lst))[0] == 1


def test_mathvista_rule_extraction():
    assert extract_answer("12", _mv()) == "12"
    assert extract_answer('The answer is "7".', _mv()) == "7"
    assert extract_answer("There are 4 cats and 1,204 dogs", _mv()) == "1204"
    mc = _mv(question_type="multi_choice", answer_type="text", choices=["red", "blue"])
    assert extract_answer("blue", mc) == "blue"
    assert extract_answer("The answer is (B).", mc) == "B"
    assert extract_answer("B. blue", mc) == "B"
    assert extract_answer("I think so", mc) == "I think so"
    assert mathvista_score(dict(mc, prediction="I think it is blu", answer="blue"))[0] == 1


# ---- MMBench-CN circular ----------------------------------------------------------------------
def test_mmbench_circular_group_needs_every_rotation():
    def rec(i, g, pred, answer):
        return {"benchmark": "mmbench_cn", "id": i, "index": i, "g_index": g, "question": "q",
                "options": {"A": "红", "B": "蓝"}, "answer": answer, "prediction": pred}
    recs = [rec(1, 1, "A", "A"), rec(1000001, 1, "B", "B"), rec(2, 2, "A", "A"), rec(1000002, 2, "A", "B")]
    rows, summary = score_records(recs)
    assert rows == [{"id": 1, "benchmark": "mmbench_cn", "score": 1.0},
                    {"id": 2, "benchmark": "mmbench_cn", "score": 0.0}]
    assert summary == {"mmbench_cn": {"score": 50.0, "n": 2}}


def test_mathvista_llm_judge_only_without_extraction():
    import json

    import httpx

    from qwenvl.evaluation.metrics.mathvista import make_openai_judge

    prompts = []

    def handler(request):
        prompts.append(json.loads(request.content)["messages"][0]["content"])
        return httpx.Response(200, json={"id": "x", "object": "chat.completion", "created": 0, "model": "j",
                                         "choices": [{"index": 0, "finish_reason": "stop",
                                                      "message": {"role": "assistant", "content": " 7 "}}]})

    judge = make_openai_judge("http://judge/v1", "j", http_client=httpx.Client(transport=httpx.MockTransport(handler)))
    rec = _mv(prediction="seven cubes, I think", answer="7", query="How many cubes?")
    assert mathvista_score(rec, judge)[0] == 1
    assert prompts[0].endswith("How many cubes?\n\nModel response: seven cubes, I think\n\nExtracted answer: ")
    assert mathvista_score(dict(rec, extraction="7"), judge)[0] == 1 and len(prompts) == 1
