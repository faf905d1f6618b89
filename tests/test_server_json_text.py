"""Streamed events' JSON (server/json_text.py) and the logprob floor that keeps it valid JSON."""

import json
import math
from types import SimpleNamespace

import pytest

from qwenvl.server import generation, json_text


@pytest.mark.parametrize("with_orjson", [True, False])
def test_dumps_reads_back_equal_with_characters_unescaped(monkeypatch, with_orjson):
    if not with_orjson:
        monkeypatch.setattr(json_text, "orjson", None)
    elif json_text.orjson is None:
        pytest.skip("orjson not installed")
    event = {"choices": [{"delta": {"content": "红色的三角形 ✓"}, "logprobs": None}], "usage": {"total": 3},
             "top": {7: -0.5}}
    text = json_text.dumps(event)
    assert "红色的三角形 ✓" in text                                # UTF-8 as itself, never \u escapes
    assert json.loads(text) == {**event, "top": {"7": -0.5}}


def test_a_masked_token_logprob_is_openais_floor_not_infinity():
    out = SimpleNamespace(token_ids=[5], logprobs=[{5: -0.25, 9: float("-inf")}])
    [entry] = generation.logprob_entries(None, out, 0, 2)
    assert entry["logprob"] == -0.25
    assert [t["logprob"] for t in entry["top_logprobs"]] == [-0.25, generation.LOGPROB_FLOOR]
    text = json_text.dumps(entry)
    assert "Infinity" not in text and "null" not in text
    assert all(math.isfinite(t["logprob"]) for t in json.loads(text)["top_logprobs"])


def test_logprob_entries_remember_token_texts_and_take_any_tokenizer():
    """Each token's text is decoded once per tokenizer (the entries stay the same); a tokenizer that cannot be a
    dictionary key, or fails on an id, still gets its entries."""
    from types import SimpleNamespace

    from qwenvl.server.generation import logprob_entries

    class Counting:
        def __init__(self):
            self.calls = 0

        def decode(self, ids):
            self.calls += 1
            if ids[0] < 0:
                raise ValueError("unknown id")
            return f"t{ids[0]}é"

    class Unhashable(Counting):
        __hash__ = None

    out = SimpleNamespace(token_ids=[5, 6, -1], logprobs=[{5: -0.1, 7: -2.0}, {6: -0.2, 5: -1.5}, {-1: -0.3}])
    tok = Counting()
    first = logprob_entries(tok, out, 0, 2)
    calls = tok.calls
    assert logprob_entries(tok, out, 0, 2) == first and tok.calls == calls == 4     # 5, 7, 6, -1 once each
    assert first[0]["token"] == "t5é" and first[0]["bytes"] == list("t5é".encode()) and first[2]["token"] == "<-1>"
    assert [e["top_logprobs"][0]["token"] for e in first] == ["t5é", "t6é", "<-1>"]
    assert logprob_entries(Unhashable(), out, 0, 2) == first
