"""The OCR tasks of DashScope's Qwen OCR models: a prompt per task and family, and the answer post-processed
into the task's documented shape.

  text_recognition            plain text
  multi_lan                   plain text, any script
  key_information_extraction  JSON with exactly the keys of `result_schema` (grammar-forced, so it parses)
  table_parsing               HTML (<table>...)
  document_parsing            LaTeX
  formula_recognition         LaTeX, without $ / $$ / fences
  advanced_recognition        text lines, each with its box in original-image pixels

The prompts are qwenvl's own wording of each task; advanced_recognition asks for the family's grounding
format, so the engine's box parser turns the lines' boxes into original-image pixels.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ..structured.limits import SchemaTooLargeError
from ..structured.spec import StructuredOutput

TASKS = ("text_recognition", "key_information_extraction", "table_parsing", "document_parsing",
         "formula_recognition", "multi_lan", "advanced_recognition")

_PROMPTS = {
    "text_recognition": "Read all the text in the image and output it exactly as written, line by line, "
                        "with no commentary.",
    "multi_lan": "Read all the text in the image, in whatever language or script it is written, and output "
                 "it exactly as written, line by line, with no translation or commentary.",
    "table_parsing": "Convert the table in the image to HTML: one <table>, with <tr>, <th>/<td> and "
                     "rowspan/colspan where cells merge. Output only the HTML.",
    "document_parsing": "Transcribe the document in the image into LaTeX: headings, paragraphs, lists, "
                        "tables and equations, in reading order. Output only the LaTeX.",
    "formula_recognition": "Write the formula in the image in LaTeX. Output only the LaTeX, without $ "
                           "delimiters.",
}
_KIE_PROMPT = ("Extract these fields from the image and answer with one JSON object that has exactly these keys "
               "(the values describe what each field holds): {schema}. Use an empty string for a field that "
               "is not in the image.")
_LINES_PROMPT = {   # advanced_recognition, in each family's grounding format
    "qwen2_vl": "Read every line of text in the image and give each line with its bounding box, as "
                "<|object_ref_start|>text<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>.",
    "json": 'Read every line of text in the image. Output a JSON list with one object per line: '
            '{"bbox_2d": [x1, y1, x2, y2], "text_content": "the line"}.',
}


class OcrTaskError(ValueError):
    """An unknown task or a bad task option; the message names it."""


@dataclass
class OcrRequest:
    task: str
    prompt: str
    structured: StructuredOutput | None = None     # the grammar the task's answer must follow, if any


@dataclass
class OcrResult:
    task: str
    text: str                                      # the answer in the task's shape (HTML, LaTeX, JSON, lines)
    kv_result: dict | None = None                  # key_information_extraction
    words_info: list[dict] = field(default_factory=list)   # advanced_recognition: text + box per line

    def to_dashscope(self) -> dict:
        """The content item DashScope answers with: the text plus `ocr_result` for the structured tasks."""
        item = {"text": self.text}
        if self.kv_result is not None:
            item["ocr_result"] = {"kv_result": self.kv_result}
        elif self.task == "advanced_recognition":
            item["ocr_result"] = {"words_info": self.words_info}
        return item


def ocr_request(task, family: str, result_schema=None, where: str = "", limits=None) -> OcrRequest:
    """`limits` (a SchemaLimits): the server's bounds on the key-information schema."""
    if task not in TASKS:
        raise OcrTaskError(f"{where}task: unknown OCR task {task!r}; use one of {', '.join(TASKS)}")
    if task == "key_information_extraction":
        if not isinstance(result_schema, dict) or not result_schema:
            raise OcrTaskError(f"{where}task_config.result_schema: key_information_extraction needs an object "
                               "of the fields to extract, e.g. {\"invoice_number\": \"the invoice number\"}")
        try:
            structured = StructuredOutput.json_schema(_kie_schema(result_schema), limits)
        except SchemaTooLargeError as e:
            raise OcrTaskError(f"{where}task_config.result_schema: {e}") from None
        return OcrRequest(task, _KIE_PROMPT.format(schema=json.dumps(result_schema, ensure_ascii=False)), structured)
    if task == "advanced_recognition":
        return OcrRequest(task, _LINES_PROMPT["qwen2_vl" if family == "qwen2_vl" else "json"])
    return OcrRequest(task, _PROMPTS[task])


def _kie_schema(result_schema: dict, depth: int = 0) -> dict:
    """Every key of result_schema becomes a required string (a nested object stays an object)."""
    if depth > 4:
        raise OcrTaskError("task_config.result_schema: nested deeper than 4 levels")
    props = {str(k): _kie_schema(v, depth + 1) if isinstance(v, dict) and v else {"type": "string", "maxLength": 256}
             for k, v in result_schema.items()}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def ocr_messages(image, prompt: str, image_options: dict | None = None) -> list[dict]:
    return [{"role": "user", "content": [{"image": image, **(image_options or {})}, {"text": prompt}]}]


def apply_to_messages(messages: list[dict], prompt: str) -> list[dict]:
    """The conversation with the task prompt as the last user turn's text (the images stay)."""
    out = [dict(m) for m in messages]
    for m in reversed(out):
        if m.get("role") == "user":
            parts = m.get("content")
            parts = parts if isinstance(parts, list) else ([] if parts is None else [parts])
            media = [p for p in parts if not (isinstance(p, str) or (isinstance(p, dict) and _is_text(p)))]
            if not media:
                raise OcrTaskError("messages: an OCR task needs an image in the last user message")
            m["content"] = media + [{"text": prompt}]
            return out
    raise OcrTaskError("messages: an OCR task needs a user message with an image")


def _is_text(part: dict) -> bool:
    return part.get("type") in ("text", "input_text") or (part.get("type") is None and "text" in part)


def postprocess(task: str, text: str, boxes: list[dict]) -> OcrResult:
    """The model's answer -> the task's shape; `boxes` are the answer's boxes in original-image pixels, as
    the engine parsed them (RequestOutput.boxes): advanced_recognition's lines."""
    if task == "key_information_extraction":
        try:
            kv = json.loads(text)
        except json.JSONDecodeError:
            kv = {}          # only when max_tokens cut the answer: the grammar admits nothing else
        return OcrResult(task, text, kv_result=kv if isinstance(kv, dict) else {})
    if task == "advanced_recognition":
        words = [{"text": b.get("label") or "", "location": _corners(b)} for b in boxes]
        return OcrResult(task, "\n".join(w["text"] for w in words) if words else text.strip(), words_info=words)
    body = _strip_fences(text)
    if task == "formula_recognition":
        body = re.sub(r"^\$+|\$+$", "", body.strip()).strip()
    return OcrResult(task, body)


def _corners(box: dict) -> list[float]:
    """x1, y1, x2, y1, x2, y2, x1, y2: the four corners clockwise from top-left, as DashScope lists them."""
    x1, y1, x2, y2 = box["x1"], box["y1"], box["x2"], box["y2"]
    return [x1, y1, x2, y1, x2, y2, x1, y2]


_FENCE = re.compile(r"```[a-zA-Z]*\n?(.*?)(?:\n?```|$)", re.S)


def _strip_fences(text: str) -> str:
    m = _FENCE.search(text)
    return (m.group(1) if m else text).strip()
