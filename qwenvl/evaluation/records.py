"""Prediction records: reading a JSONL file and checking each record against its benchmark's schema.

Every record: ``id`` (string or number, unique in the file), ``benchmark``, ``prediction`` (str), and
- docvqa, chartqa: ``answers`` [str];  textvqa: ``answers`` [10 str];
- ai2d: ``options`` [str], ``answer`` (letter);
- mmbench_cn: ``options`` {"A": text, ...}, ``answer``, ``index``, ``g_index``, ``question``;
- mmmu: ``question_type`` (multiple-choice | open), ``options`` (multiple-choice), ``answer`` (letter;
  for open: str, [str] or a list written as a string);
- mathvista: ``question_type`` (multi_choice | free_form), ``answer_type`` (text | integer | float |
  list), ``choices`` (list | null), ``precision`` (number | null; required for float), ``answer``,
  optional ``extraction``.
Extra fields are allowed and ignored.

Every problem is reported as a ``RecordError`` naming the line number and the field, so the CLI
can print one actionable line and exit non-zero.
"""

import json
from typing import Iterator

BENCHMARKS = ("docvqa", "chartqa", "textvqa", "ai2d", "mmmu", "mathvista", "mmbench_cn")


class RecordError(ValueError):
    def __init__(self, line: int, field: str | None, message: str):
        self.line, self.field = line, field
        where = f"line {line}" + (f", field '{field}'" if field else "")
        super().__init__(f"{where}: {message}")


def _is_str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _require(rec: dict, line: int, field: str, ok, expected: str):
    if field not in rec:
        raise RecordError(line, field, f"missing (a {rec.get('benchmark')} record needs {expected})")
    if not ok(rec[field]):
        raise RecordError(line, field, f"expected {expected}, got {json.dumps(rec[field])[:80]}")


def _letter_ok(options_len: int):
    return lambda v: isinstance(v, str) and len(v) == 1 and 0 <= ord(v) - ord("A") < options_len


def validate(rec, line: int) -> dict:
    """Check one parsed record; returns it unchanged or raises RecordError."""
    if not isinstance(rec, dict):
        raise RecordError(line, None, "a record must be a JSON object")
    _require(rec, line, "benchmark", lambda v: isinstance(v, str), "a benchmark name")
    bench = rec["benchmark"]
    if bench not in BENCHMARKS:
        raise RecordError(line, "benchmark", f"unknown benchmark {bench!r} (expected one of {', '.join(BENCHMARKS)})")
    _require(rec, line, "id", lambda v: isinstance(v, str) or _is_num(v), "a string or number id")
    _require(rec, line, "prediction", lambda v: isinstance(v, str), "the model's answer as a string")
    req = lambda field, ok, expected: _require(rec, line, field, ok, expected)  # noqa: E731
    if bench in ("docvqa", "chartqa"):
        req("answers", lambda v: _is_str_list(v) and len(v) > 0, "a non-empty list of strings")
    elif bench == "textvqa":
        req("answers", lambda v: _is_str_list(v) and len(v) == 10, "a list of 10 strings (the human answers)")
    elif bench == "ai2d":
        req("options", lambda v: _is_str_list(v) and len(v) > 0, "a non-empty list of option texts")
        req("answer", _letter_ok(len(rec["options"])), f"an option letter A..{chr(64 + len(rec['options']))}")
    elif bench == "mmbench_cn":
        req("options", lambda v: isinstance(v, dict) and v and all(isinstance(k, str) and len(k) == 1 and k.isupper()
                                                                  for k in v), 'an object {"A": text, ...}')
        req("answer", lambda v: isinstance(v, str) and v in rec["options"], "one of the option letters")
        req("index", lambda v: _is_num(v) or isinstance(v, str), "the record's index")
        req("g_index", lambda v: _is_num(v) or isinstance(v, str), "the circular group's index")
        req("question", lambda v: isinstance(v, str), "the question text")
    elif bench == "mmmu":
        req("question_type", lambda v: v in ("multiple-choice", "open"), "'multiple-choice' or 'open'")
        if rec["question_type"] == "multiple-choice":
            req("options", lambda v: _is_str_list(v) and len(v) > 0, "a non-empty list of option texts")
            req("answer", lambda v: isinstance(v, str) or _is_str_list(v), "an option letter")
        else:
            req("answer", lambda v: isinstance(v, str) or _is_num(v) or _is_str_list(v),
                "a string, a list of strings, or a list written as a string")
    elif bench == "mathvista":
        req("question_type", lambda v: v in ("multi_choice", "free_form"), "'multi_choice' or 'free_form'")
        req("answer_type", lambda v: v in ("text", "integer", "float", "list"), "text, integer, float or list")
        if rec["question_type"] == "multi_choice":
            req("choices", lambda v: isinstance(v, list) and len(v) > 0, "a non-empty list of choices")
        elif "choices" in rec:
            req("choices", lambda v: v is None or isinstance(v, list), "a list or null")
        if rec["answer_type"] == "float":
            req("precision", _is_num, "a number of decimal places (e.g. 2 or 2.0)")
        elif "precision" in rec:
            req("precision", lambda v: v is None or _is_num(v), "a number or null")
        req("answer", lambda v: isinstance(v, str) or _is_num(v), "the gold answer (a string)")
    return rec


def read_records(path: str) -> Iterator[tuple[int, dict]]:
    """Yields (line number, validated record); blank lines are skipped; ids must be unique."""
    seen: dict = {}
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as e:
                raise RecordError(n, None, f"not valid JSON ({e.msg} at column {e.colno})") from None
            validate(rec, n)
            key = (type(rec["id"]).__name__, rec["id"])
            if key in seen:
                raise RecordError(n, "id", f"duplicate id {rec['id']!r} (first on line {seen[key]})")
            seen[key] = n
            yield n, rec
