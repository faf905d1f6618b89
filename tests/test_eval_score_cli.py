"""`eval score FILE.jsonl [--per-record OUT]`: output lines, the aggregate table, and clean errors
(line number and field, non-zero exit, no traceback) for bad input."""

import json
import subprocess
import sys

import pytest

from qwenvl.evaluation import cli

RECORDS = [
    {"id": "d1", "benchmark": "docvqa", "prediction": "ac", "answers": ["ab"]},                 # 0.5
    {"id": 2, "benchmark": "chartqa", "prediction": "12%", "answers": ["0.12"]},                # 1
    {"id": "t1", "benchmark": "textvqa", "prediction": "Two", "answers": ["2"] * 3 + ["x"] * 7},  # 0.9
    {"id": "a1", "benchmark": "ai2d", "prediction": "the answer is a dog", "options": ["dog", "cat"],
     "answer": "A"},                                                                           # 1
    {"id": "a2", "benchmark": "ai2d", "prediction": "C", "options": ["dog", "cat", "cow"], "answer": "B"},  # 0
    {"id": "m1", "benchmark": "mmmu", "prediction": "(B)", "question_type": "multiple-choice",
     "options": ["1", "2"], "answer": "B"},                                                    # 1
    {"id": "m2", "benchmark": "mmmu", "prediction": "It is 3.429", "question_type": "open",
     "answer": "['24/7', '3.429']"},                                                           # 1
    {"id": "v1", "benchmark": "mathvista", "prediction": "x", "question_type": "free_form",
     "answer_type": "float", "choices": None, "precision": 2.0, "answer": "1.46", "extraction": "1.456"},  # 1
    {"id": "c1", "benchmark": "mmbench_cn", "prediction": "A", "options": {"A": "是", "B": "否"}, "answer": "A",
     "index": 7, "g_index": 7, "question": "是吗"},
    {"id": "c2", "benchmark": "mmbench_cn", "prediction": "B", "options": {"A": "否", "B": "是"}, "answer": "B",
     "index": 1000007, "g_index": 7, "question": "是吗"},                                        # group 7: 1
]


def _write(path, lines):
    path.write_text("".join((json.dumps(x, ensure_ascii=False) if not isinstance(x, str) else x) + "\n"
                            for x in lines), encoding="utf-8")
    return str(path)


def test_score_file_and_per_record(tmp_path, capsys):
    src = _write(tmp_path / "p.jsonl", RECORDS)
    out = tmp_path / "scores.jsonl"
    assert cli.main(["eval", "score", src, "--per-record", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["d1", 2, "t1", "a1", "a2", "m1", "m2", "v1", 7]
    assert [r["score"] for r in rows] == pytest.approx([0.5, 1, 0.9, 1, 0, 1, 1, 1, 1])
    table = capsys.readouterr().out
    assert "| docvqa | 1 | 50.00 |" in table
    assert "| ai2d | 2 | 50.00 |" in table
    assert "| textvqa | 1 | 90.00 |" in table
    assert "| mmbench_cn | 1 | 100.00 |" in table


@pytest.mark.parametrize("lines,needle", [
    ([RECORDS[0], {"id": 9, "benchmark": "docvqa", "prediction": "x"}], "line 2, field 'answers': missing"),
    ([{"id": 1, "benchmark": "vqav3", "prediction": "x"}], "line 1, field 'benchmark': unknown benchmark 'vqav3'"),
    ([RECORDS[0], "", '{"id": 3, "benchmark": '], "line 3: not valid JSON"),
    ([{"benchmark": "chartqa", "prediction": "x", "answers": ["1"]}], "line 1, field 'id': missing"),
    ([{"id": 1, "benchmark": "textvqa", "prediction": "x", "answers": ["a"] * 9}], "field 'answers': expected a list of 10"),
    ([{"id": 1, "benchmark": "ai2d", "prediction": "A", "options": ["x", "y"], "answer": "C"}], "field 'answer'"),
    ([{"id": 1, "benchmark": "docvqa", "prediction": None, "answers": ["a"]}], "field 'prediction'"),
    ([RECORDS[0], RECORDS[0]], "line 2, field 'id': duplicate id 'd1' (first on line 1)"),
    ([{"id": 1, "benchmark": "mathvista", "prediction": "x", "question_type": "free_form", "answer_type": "float",
       "answer": "1"}], "field 'precision': missing"),
    ([[1, 2]], "line 1: a record must be a JSON object"),
])
def test_bad_records(tmp_path, capsys, lines, needle):
    src = _write(tmp_path / "bad.jsonl", lines)
    assert cli.main(["eval", "score", src]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_missing_file(tmp_path, capsys):
    assert cli.main(["eval", "score", str(tmp_path / "none.jsonl")]) == 2
    assert "No such file" in capsys.readouterr().err


def test_subprocess_exit_code_and_no_traceback(tmp_path):
    src = _write(tmp_path / "bad.jsonl", [RECORDS[1], '{"id": 5, "benchmark": "chartqa", "prediction": "1"}'])
    r = subprocess.run([sys.executable, "-m", "qwenvl.evaluation.cli", "eval", "score", src],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "line 2, field 'answers'" in r.stderr and "Traceback" not in r.stderr


def test_add_eval_subcommand_registers_score_and_run():
    import argparse
    parser = argparse.ArgumentParser()
    cli.add_eval_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "score", "f.jsonl", "--per-record", "o.jsonl"])
    assert args.func is cli.run_eval and args.per_record == "o.jsonl"
    args = parser.parse_args(["eval", "run", "--benchmark", "ai2d", "--data", "d", "--endpoint", "http://x",
                              "--api", "dashscope", "--limit", "5", "--concurrency", "4"])
    assert (args.limit, args.concurrency, args.api) == (5, 4, "dashscope")


def test_float_ids_and_unhashable_answer(tmp_path, capsys):
    src = _write(tmp_path / "p.jsonl", [dict(RECORDS[1], id=1.5)])
    assert cli.main(["eval", "score", src]) == 0
    bad = dict(RECORDS[8], answer=["A"])
    assert cli.main(["eval", "score", _write(tmp_path / "b.jsonl", [bad])]) == 2
    assert "line 1, field 'answer'" in capsys.readouterr().err
