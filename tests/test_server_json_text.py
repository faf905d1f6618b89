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
