"""Tiny synthetic datasets in each benchmark's official release format, with known answers, so the
whole run path (loader -> predict -> JSONL -> scorer -> report) is tested offline.

``make(name, out_dir) -> list[item]``; each item: ``question`` (unique, no question is a substring of
another), ``right`` (the answer to give; for multiple choice the option TEXT, ``mcq`` True) and
``wrong`` (a wrong answer with a known score).
"""

import base64
import io
import json
from pathlib import Path

from PIL import Image, ImageDraw

from .datasets import NAMES


def _image(text: str, color=(230, 230, 250), fmt="PNG") -> bytes:
    img = Image.new("RGB", (96, 48), color)
    ImageDraw.Draw(img).text((4, 16), text, fill=(0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")


def _docvqa(d: Path) -> list[dict]:
    qs = [("What is the invoice number?", ["INV-001"], "INV-001", "INV-999"),
          ("What is the date?", ["5 January 2023", "2023-01-05"], "2023-01-05", "June"),
          ("Who signed the letter?", ["John Smith"], "John Smith", "Jon Smyth")]  # wrong: ANLS 0.8
    data = []
    for i, (q, answers, _, _) in enumerate(qs):
        _write(d / "val" / "documents" / f"doc{i}.png", _image(answers[0]))
        data.append({"questionId": 100 + i, "question": q, "image": f"documents/doc{i}.png", "docId": i,
                     "answers": answers, "data_split": "val"})
    _write(d / "val" / "val_v1.0.json", {"dataset_name": "docvqa", "dataset_split": "val",
                                          "dataset_version": "1.0", "data": data})
    return [{"question": q, "right": r, "wrong": w} for q, _, r, w in qs]


def _chartqa(d: Path) -> list[dict]:
    splits = {"human": [("What is the value of the red bar?", "42", "45"),     # wrong: 7% off
                        ("Which year has the highest sales?", "2019", "2018")],
              "augmented": [("What percentage of votes is blue?", "30", "31")]}  # wrong: within 5%
    items = []
    for split, qs in splits.items():
        entries = []
        for i, (q, label, wrong) in enumerate(qs):
            name = f"{split}{i}.png"
            _write(d / "test" / "png" / name, _image(label))
            entries.append({"imgname": name, "query": q, "label": label})
            items.append({"question": q, "right": label, "wrong": wrong})
        _write(d / "test" / f"test_{split}.json", entries)
    return items


def _textvqa(d: Path) -> list[dict]:
    qs = [("What brand is shown?", ["coca cola"] * 6 + ["coke"] * 4, "Coca-Cola", "pepsi"),
          ("What number is on the shirt?", ["23"] * 2 + ["28"] * 8, "28", "23")]  # wrong: 0.6
    data = []
    for i, (q, answers, _, _) in enumerate(qs):
        _write(d / "train_images" / f"img{i}.jpg", _image(answers[-1], fmt="JPEG"))
        data.append({"question_id": 500 + i, "image_id": f"img{i}", "question": q, "answers": answers,
                     "image_classes": [], "set_name": "val"})
    _write(d / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "dataset_type": "val", "data": data})
    return [{"question": q, "right": r, "wrong": w} for q, _, r, w in qs]


def _ai2d(d: Path) -> list[dict]:
    images = {"0.png": [("Which part is the root?", ["leaf", "stem", "root", "flower"], 2)],
              "1.png": [("What does the arrow point to?", ["sun", "moon", "cloud", "rain"], 0),
                        ("How many stages are shown?", ["2", "3", "4", "5"], 1)],
              "2.png": [("Which is not in the test split?", ["x", "y"], 0)]}
    items = []
    for name, qs in images.items():
        _write(d / "images" / name, _image(name))
        questions = {}
        for j, (q, texts, correct) in enumerate(qs):
            questions[q] = {"abcLabel": False, "answerTexts": texts, "correctAnswer": correct,
                            "questionId": f"{name}-{j}"}
            items.append({"question": q, "right": texts[correct], "wrong": texts[(correct + 1) % len(texts)],
                          "mcq": True})
        _write(d / "questions" / f"{name}.json", {"imageName": name, "questions": questions})
    _write(d / "ai2d_test_ids.csv", b"0\n1\n")
    return items[:3]


def _mmmu(d: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [("validation_Math_1", "What is 1+2? <image 1>", "['1', '2', '3', '4']", "C", "multiple-choice", "3", "2"),
            ("validation_Math_2", "Which shape is round? <image 1>", "['square', 'circle']", "B", "multiple-choice",
             "circle", "I am not sure"),  # wrong: the seed-42 fallback draws A
            ("validation_Math_3", "What is 6 times 7? <image 1>", "[]", "42", "open", "The answer is 42", "41")]
    table = {"id": [], "question": [], "options": [], "explanation": [], "image_1": [], "image_2": [],
             "img_type": [], "answer": [], "topic_difficulty": [], "question_type": [], "subfield": []}
    for rid, q, options, answer, qtype, _, _ in rows:
        for k, v in (("id", rid), ("question", q), ("options", options), ("explanation", ""),
                     ("image_1", {"bytes": _image(rid), "path": f"{rid}.png"}), ("image_2", None),
                     ("img_type", "['Diagrams']"), ("answer", answer), ("topic_difficulty", "Easy"),
                     ("question_type", qtype), ("subfield", "Algebra")):
            table[k].append(v)
    (d / "Math").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(table), d / "Math" / "validation-00000-of-00001.parquet")
    return [{"question": q.split(" <image")[0], "right": right, "wrong": wrong, "mcq": qtype == "multiple-choice"}
            for _, q, _, _, qtype, right, wrong in rows]


def _mathvista(d: Path) -> list[dict]:
    problems = [("How many cubes are there?", "free_form", "integer", None, None, "5", "5", "6"),
                ("Which shape is drawn?", "multi_choice", "text", ["circle", "square", "triangle"], None,
                 "square", "square", "(C) triangle"),
                ("What is the ratio of red to all?", "free_form", "float", None, 1.0, "0.6",
                 "The ratio is 0.6.", "0.7")]
    out, items = {}, []
    for i, (q, qt, at, choices, precision, answer, right, wrong) in enumerate(problems, 1):
        _write(d / "images" / f"{i}.jpg", _image(answer, fmt="JPEG"))
        hint = "Please answer the question and provide the final answer at the end."
        query = f"Hint: {hint}\nQuestion: {q}"
        if choices:
            query += "\nChoices:\n" + "\n".join(f"({chr(65 + j)}) {c}" for j, c in enumerate(choices))
        out[str(i)] = {"question": q, "image": f"images/{i}.jpg", "choices": choices, "unit": None,
                       "precision": precision, "answer": answer, "question_type": qt, "answer_type": at,
                       "pid": str(i), "metadata": {}, "query": query}
        items.append({"question": q, "right": right, "wrong": wrong})
    _write(d / "testmini.json", out)
    return items


def _mmbench_cn(d: Path, circular: bool = True) -> list[dict]:
    """VLMEvalKit layout: rotated copies at index + k * 1e6 whose image refers to the base row."""
    from .datasets.mmbench import GROUP, _rotations

    base = [("图中是什么颜色？", "提示：看背景", ["红色", "蓝色", "绿色", "黄色"], "B"),
            ("图中有几个字？", "", ["一个", "两个", "三个", "四个"], "C")]
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
              "l2-category", "comment", "split"]
    rows, items = [], []
    for i, (q, hint, opts, ans) in enumerate(base):
        img = base64.b64encode(_image(str(i))).decode()
        row = {"index": str(i), "question": q, "hint": hint, **dict(zip("ABCD", opts)), "answer": ans,
               "category": "color", "image": img, "source": "synthetic", "l2-category": "x", "comment": "",
               "split": "dev"}
        for k, r in enumerate(_rotations(row) if circular else [row]):
            rows.append(dict(r, image=str(i)) if k else r)
        right = opts["ABCD".index(ans)]
        items.append({"question": q, "right": right, "wrong": opts[("ABCD".index(ans) + 1) % 4], "mcq": True})
    rows.sort(key=lambda r: int(r["index"]) % GROUP * 10 + int(r["index"]) // GROUP)
    lines = ["\t".join(header)] + ["\t".join(r[h] for h in header) for r in rows]
    _write(d / "MMBench_DEV_CN.tsv", ("\n".join(lines) + "\n").encode())
    return items


_MAKERS = {"docvqa": _docvqa, "chartqa": _chartqa, "textvqa": _textvqa, "ai2d": _ai2d, "mmmu": _mmmu,
           "mathvista": _mathvista, "mmbench_cn": _mmbench_cn}
assert set(_MAKERS) == set(NAMES)


def make(name: str, out_dir) -> list[dict]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _MAKERS[name](out)
