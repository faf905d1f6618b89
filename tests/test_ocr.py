"""OCR tasks: prompts, post-processing into each task's shape, LLM.ocr, the CLI and DashScope's ocr_options."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from qwenvl.answers.ocr import OcrTaskError, apply_to_messages, ocr_request, postprocess

FIELDS = {"invoice_number": "the invoice number", "seller": {"name": "seller name", "city": "seller city"}}


@pytest.mark.parametrize("task, raw, expected", [
    ("table_parsing", "```html\n<table><tr><td>1</td></tr></table>\n```", "<table><tr><td>1</td></tr></table>"),
    ("document_parsing", "```latex\n\\section{Intro}\nText\n```", "\\section{Intro}\nText"),
    ("formula_recognition", "$$E = mc^2$$", "E = mc^2"),
    ("formula_recognition", "```latex\n$a^2+b^2$\n```", "a^2+b^2"),
    ("text_recognition", "  line one\nline two \n", "line one\nline two"),
    ("multi_lan", "你好\nBonjour", "你好\nBonjour"),
])
def test_text_tasks_post_process_into_their_shape(task, raw, expected):
    assert postprocess(task, raw, []).text == expected


def test_key_information_and_lines_results():
    kv = postprocess("key_information_extraction", '{"invoice_number":"A1","seller":{"name":"X","city":"Y"}}', [])
    assert kv.kv_result == {"invoice_number": "A1", "seller": {"name": "X", "city": "Y"}}
    assert kv.to_dashscope()["ocr_result"] == {"kv_result": kv.kv_result}
    boxes = [{"label": "Total 12.00", "x1": 10.0, "y1": 20.0, "x2": 110.5, "y2": 40.0}]
    lines = postprocess("advanced_recognition", '[{"bbox_2d": [1,2,3,4], "text_content": "Total 12.00"}]', boxes)
    assert lines.text == "Total 12.00"
    assert lines.words_info == [{"text": "Total 12.00", "location": [10.0, 20.0, 110.5, 20.0, 110.5, 40.0, 10.0, 40.0]}]


def test_requests_and_their_errors():
    kie = ocr_request("key_information_extraction", "qwen2_5_vl", FIELDS)
    schema = kie.structured.schema
    assert schema["required"] == ["invoice_number", "seller"] and schema["properties"]["seller"]["required"] == ["name", "city"]
    assert "invoice_number" in kie.prompt
    assert "<|box_start|>" in ocr_request("advanced_recognition", "qwen2_vl").prompt
    assert "bbox_2d" in ocr_request("advanced_recognition", "qwen3_vl").prompt
    with pytest.raises(OcrTaskError, match="unknown OCR task 'poetry'"):
        ocr_request("poetry", "qwen2_vl")
    with pytest.raises(OcrTaskError, match="result_schema"):
        ocr_request("key_information_extraction", "qwen2_vl")
    msgs = [{"role": "user", "content": [{"image": "a.png"}, {"text": "ignored"}]}]
    assert apply_to_messages(msgs, "PROMPT")[0]["content"] == [{"image": "a.png"}, {"text": "PROMPT"}]
    assert msgs[0]["content"][1] == {"text": "ignored"}                      # the caller's list is untouched
    with pytest.raises(OcrTaskError, match="needs an image"):
        apply_to_messages([{"role": "user", "content": "read this"}], "PROMPT")


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    path = tmp_path_factory.mktemp("ocr") / "doc.png"
    Image.new("RGB", (96, 64), (250, 250, 250)).save(path)
    return path


def test_llm_ocr_key_information_is_exactly_the_schema(doc):
    from qwenvl.llm import LLM

    result = LLM(device="cpu").ocr(str(doc), "key_information_extraction", FIELDS)
    assert set(result.kv_result) == {"invoice_number", "seller"} and set(result.kv_result["seller"]) == {"name", "city"}


def test_cli_ocr_prints_the_task_result(doc):
    r = subprocess.run([sys.executable, "-m", "qwenvl", "ocr", str(doc), "--device", "cpu", "--task",
                        "key_information_extraction", "--result-schema", json.dumps({"total": "amount due"})],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert list(json.loads(r.stdout)) == ["total"]
    bad = subprocess.run([sys.executable, "-m", "qwenvl", "ocr", str(doc), "--task", "poetry"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unknown OCR task" in bad.stderr
