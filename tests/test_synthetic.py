"""The synthetic training data: determinism, ranges, pixel-true grounding boxes, the word split,
Chinese questions, speed, scoring and the tokenizer trained on the task corpus."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

pytest.importorskip("PIL")
from qwenvl.synthetic import fonts  # noqa: E402

try:
    fonts.latin_fonts()
    fonts.wordlist_path()
except fonts.MissingAssetError as e:  # pragma: no cover - depends on the machine
    pytest.skip(f"synthetic data needs fonts and a word list: {e}", allow_module_level=True)

from qwenvl.evaluation import task_eval  # noqa: E402
from qwenvl.synthetic import (  # noqa: E402
    LANGS, TASKS, SyntheticDataset, grounding_answer, make_sample, messages, to_grid)
from qwenvl.synthetic.scenes import COLORS_ZH, GAP, MIN_SHAPE, SHAPES, SHAPES_ZH  # noqa: E402
from qwenvl.synthetic.text import is_heldout, split_words  # noqa: E402

CJK = re.compile(r"[\u4e00-\u9fff]")
GROUND_RE = re.compile(r"^<\|object_ref_start\|>(.+)<\|object_ref_end\|><\|box_start\|>"
                       r"\((\d+),(\d+)\),\((\d+),(\d+)\)<\|box_end\|>$")


def _check_size(img):
    w, h = img.size
    assert 200 <= w <= 600 and 200 <= h <= 600, img.size
    assert max(w, h) / min(w, h) <= 3.0, img.size


@pytest.mark.parametrize("task", TASKS)
def test_deterministic(task):
    for i in range(3):
        a, b = make_sample(7, i, task), make_sample(7, i, task)
        assert (a.question, a.answer, a.lang) == (b.question, b.answer, b.lang)
        assert a.image.size == b.image.size
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert make_sample(7, 0, task).image.tobytes() != make_sample(7, 1, task).image.tobytes()
    assert make_sample(7, 0, task).image.tobytes() != make_sample(8, 0, task).image.tobytes()
    # the default mixture is deterministic as well
    a, b = make_sample(3, 11), make_sample(3, 11)
    assert (a.task, a.question, a.answer) == (b.task, b.question, b.answer)
    assert a.image.tobytes() == b.image.tobytes()


def _boxes_apart(shapes):
    for i, a in enumerate(shapes):
        for b in shapes[i + 1:]:
            x = a.box[0] >= b.box[2] + GAP or b.box[0] >= a.box[2] + GAP
            y = a.box[1] >= b.box[3] + GAP or b.box[1] >= a.box[3] + GAP
            assert x or y, (a.box, b.box)


def test_scene_ranges():
    for i in range(60):
        for task in ("count", "color", "ground"):
            s = make_sample(1, i, task)
            _check_size(s.image)
            shapes = s.meta["shapes"]
            W, H = s.image.size
            for sh in shapes:
                x0, y0, x1, y1 = sh.box
                assert x1 - x0 >= MIN_SHAPE and y1 - y0 >= MIN_SHAPE, sh.box
                assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
            _boxes_apart(shapes)
            if task == "count":
                k = int(s.answer)
                assert 1 <= k <= 5
                kinds = [sh.kind for sh in shapes]
                assert kinds.count(s.meta["kind"]) == k and len(kinds) - k <= 3, (s.question, kinds)
                assert (s.meta["kind"] + "s" in s.question) if s.lang == "en" else s.question.startswith("图中有几个")
            elif task == "color":
                t = s.meta["target"]
                assert [sh.kind for sh in shapes].count(t.kind) == 1 and len(shapes) <= 4
            else:
                t = s.meta["target"]
                assert [(sh.kind, sh.color) for sh in shapes].count((t.kind, t.color)) == 1


def test_other_tasks_in_range():
    for i in range(40):
        for task in ("read", "chart", "table"):
            s = make_sample(2, i, task)
            _check_size(s.image)
            assert s.answer.strip() == s.answer and s.answer
        r = make_sample(2, i, "read")
        x0, y0, x1, y1 = r.meta["text_box"]
        assert 0 <= x0 and 0 <= y0 and x1 <= r.image.size[0] and y1 <= r.image.size[1]
        assert 24 * 0.5 <= y1 - y0   # glyph height of a 24-64 px font
        c = make_sample(2, i, "chart")
        assert 2 <= len(c.meta["labels"]) <= 6 and c.answer.isdigit()
        assert c.answer in [str(v) for v in c.meta["values"]]


def test_grounding_box_matches_pixels():
    for i in range(40):
        s = make_sample(4, i, "ground", "en" if i % 2 else "zh")
        if s.meta.get("blurred"):
            continue
        t = s.meta["target"]
        img = np.asarray(s.image).astype(int)
        W, H = s.image.size
        x0, y0, x1, y1 = s.boxes[0]
        # only the target lies within GAP - 1 pixels of its box: other shapes are GAP pixels away
        m = GAP - 1
        rx0, ry0, rx1, ry1 = max(0, x0 - m), max(0, y0 - m), min(W, x1 + m), min(H, y1 + m)
        region = img[ry0:ry1, rx0:rx1]
        tol = 12 if t.color == "white" else 20
        mask = np.linalg.norm(region - np.array(t.rgb), axis=-1) < tol
        if t.outline_rgb is not None:
            mask |= np.linalg.norm(region - np.array(t.outline_rgb), axis=-1) < 20
        ys, xs = np.nonzero(mask)
        assert len(xs), (i, t)
        got = (xs.min() + rx0, ys.min() + ry0, xs.max() + 1 + rx0, ys.max() + 1 + ry0)
        assert all(abs(a - b) <= 1 for a, b in zip(got, (x0, y0, x1, y1))), (i, t.kind, got, s.boxes[0])
        # the answer is the exact Qwen2-VL form on the 0..1000 grid of the original canvas
        mt = GROUND_RE.match(s.answer)
        assert mt, s.answer
        assert tuple(int(v) for v in mt.groups()[1:]) == tuple(round(v) for v in (
            x0 / W * 1000, y0 / H * 1000, x1 / W * 1000, y1 / H * 1000))
        label = mt.group(1)
        assert label == (f"the {t.color} {t.kind}" if s.lang == "en" else label)
        assert task_eval.score_sample(s, s.answer) == 1.0


def test_heldout_words_never_trained():
    train_plain, train_apos = split_words("train")
    held_plain, held_apos = split_words("heldout")
    train = set(train_plain) | set(train_apos)
    held = set(held_plain) | set(held_apos)
    assert train and held and not train & held
    assert 0.05 < len(held) / (len(held) + len(train)) < 0.15
    for s in task_eval.heldout_set("read", "en", 40, seed=0):
        if not s.answer.isdigit():
            assert s.answer in held and is_heldout(s.answer)
    for s in task_eval.heldout_set("chart", "zh", 10, seed=0):
        assert all(lab.lower() not in train for lab in s.meta["labels"])
    for i in range(40):
        s = make_sample(0, i, "read")
        if not s.answer.isdigit():
            assert s.answer in train


def test_chinese_questions_and_answers():
    zh = {t: make_sample(0, 0, t, "zh") for t in TASKS}
    assert all(CJK.search(s.question) for s in zh.values())
    assert zh["count"].question.startswith("图中有几个") and zh["count"].answer.isdigit()
    assert zh["color"].question.endswith("是什么颜色？") and zh["color"].answer in (
        "红色", "绿色", "蓝色", "黄色", "黑色", "白色", "橙色", "紫色")
    assert zh["ground"].question.startswith("找到") and "的" in zh["ground"].question
    assert zh["read"].question == "图中写的是什么？"
    assert zh["chart"].question.endswith("的数值是多少？")
    langs = {make_sample(9, i).lang for i in range(60)}
    tasks = {make_sample(9, i).task for i in range(200)}
    assert langs == set(LANGS) and tasks == set(TASKS)


def test_messages_and_dataset():
    s = make_sample(0, 5, "color", "en")
    m = messages(s)
    assert m[0]["role"] == "user" and m[0]["content"][0]["image"] is s.image
    assert m[0]["content"][1] == {"text": s.question}
    assert m[1] == {"role": "assistant", "content": s.answer}
    ds = SyntheticDataset(seed=1, length=10, tasks=("read", "chart"), langs=("zh",))
    assert len(ds) == 10 and {ds[i].task for i in range(10)} <= {"read", "chart"}
    assert all(ds[i].lang == "zh" for i in range(10))
    with pytest.raises(IndexError):
        ds[10]
    with pytest.raises(ValueError, match="unknown task"):
        make_sample(0, 0, "dance")


def test_speed():
    make_sample(0, 0)
    for t in TASKS:   # warm the font caches
        make_sample(0, 0, t)
    n, t0 = 200, time.perf_counter()
    for i in range(n):
        make_sample(11, i)
    rate = n / (time.perf_counter() - t0)
    assert rate > 50, f"{rate:.0f} samples/s"   # ~750/s on one free core; loose for shared CI machines


def test_scoring(capsys):
    size = (400, 200)
    ans = grounding_answer("the red circle", (100, 50, 200, 150), size)
    assert ans.endswith("<|box_start|>(250,250),(500,750)<|box_end|>") and to_grid((0, 0, 400, 200), size) == (0, 0, 1000, 1000)
    assert task_eval.score("ground", ans, ans, size) == 1.0
    assert task_eval.score("ground", "(260,260),(510,760)", ans, size, box=(100, 50, 200, 150)) == 1.0
    assert task_eval.score("ground", "(500,250),(750,750)", ans, size) == 0.0
    assert task_eval.score("ground", "no box here", ans, size) == 0.0
    assert task_eval.score("count", " 3\n", "3") == 1.0 and task_eval.score("count", "4", "3") == 0.0
    assert task_eval.score("color", "Red.", "red") == 1.0 and task_eval.score("color", "红色", "红色") == 1.0
    assert task_eval.score("read", "Hello", "hello") == 0.0 and task_eval.score("read", " hello ", "hello") == 1.0
    assert task_eval.score("chart", "104", "100") == 1.0 and task_eval.score("chart", "106", "100") == 0.0
    assert task_eval.score("chart", "1,000", "1000") == 1.0 and task_eval.score("chart", "0", "0") == 1.0
    samples = task_eval.heldout_set("count", "en", 4, seed=1)
    acc = task_eval.evaluate(lambda batch: [s.answer for s in batch], samples, batch_size=3)
    assert acc == {"all": 1.0, "count/en": 1.0}
    assert task_eval.evaluate(lambda batch: [s.answer for s in batch], samples, batch_size=3, progress=True) == acc
    assert "4/4" in capsys.readouterr().err                        # the progress bar went over every item


def test_missing_fonts_message(monkeypatch, tmp_path):
    monkeypatch.setattr(fonts, "SYSTEM_FONT_DIRS", ())
    monkeypatch.setenv("QWENVL_FONT_DIRS", str(tmp_path))
    monkeypatch.delenv("QWENVL_SYNTH_ASSETS", raising=False)
    fonts._scan.cache_clear()
    try:
        with pytest.raises(fonts.MissingAssetError, match="fonts-dejavu-core"):
            fonts.latin_fonts()
    finally:
        fonts._scan.cache_clear()


def test_export_assets(monkeypatch, tmp_path):
    out = fonts.export_assets(tmp_path / "assets", include_cjk=False)
    assert (out / "words.txt").is_file() and any((out / "fonts").glob("DejaVuSans*.ttf"))
    monkeypatch.setattr(fonts, "SYSTEM_FONT_DIRS", ())
    monkeypatch.setenv("QWENVL_SYNTH_ASSETS", str(out))
    fonts._scan.cache_clear()
    try:
        assert all(p.startswith(str(out)) for p in fonts.latin_fonts())
    finally:
        fonts._scan.cache_clear()


@pytest.mark.slow
def test_tokenizer_round_trip(tmp_path):
    from tokenizers import Tokenizer

    from qwenvl.training.corpus import build_tokenizer
    from qwenvl.synthetic.text import all_words
    from qwenvl.training.tokenizer_train import SPECIAL_TOKENS

    ids = build_tokenizer(tmp_path, vocab_size=5000)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert sorted(ids.values()) == list(range(5000, 5000 + len(SPECIAL_TOKENS)))
    assert (tmp_path / "chat_template.jinja").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    words = all_words()[::50]
    lengths = [len(tok.encode(w).ids) for w in words]
    assert sum(lengths) / len(lengths) < 3.6 and max(lengths) <= 12
    for t in TASKS:
        for lang in LANGS:
            s = make_sample(5, 1, t, lang)
            for text in (s.question, s.answer):
                enc = tok.encode(text)
                assert tok.decode(enc.ids, skip_special_tokens=False) == text
            if t == "ground":
                enc = tok.encode(s.answer)
                assert enc.ids[0] == ids["<|object_ref_start|>"] and enc.ids[-1] == ids["<|box_end|>"]
                assert len(enc.ids) <= 30
            if lang == "zh":
                assert len(tok.encode(s.question).ids) <= 12


def test_same_pixels_in_another_process():
    """Worker processes (other hash seeds, cold caches) draw exactly the same samples."""
    import hashlib
    import os
    import subprocess
    import sys

    code = ("import hashlib;from qwenvl.synthetic import make_sample;"
            "print(';'.join(hashlib.sha1(make_sample(21, i).image.tobytes()).hexdigest()+make_sample(21, i).answer"
            " for i in range(12)))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    here = ";".join(hashlib.sha1(make_sample(21, i).image.tobytes()).hexdigest() + make_sample(21, i).answer
                    for i in range(12))
    assert out.strip() == here


def test_followups_are_unambiguous_answers_about_the_same_image():
    import random
    from collections import Counter

    from qwenvl.synthetic.followups import conversation, followups
    from qwenvl.evaluation.task_eval import score
    seen = Counter()
    for i in range(60):
        s = make_sample(4, i, task=TASKS[i % len(TASKS)], lang=("en", "zh")[i % 2])
        extra = followups(s, random.Random(i), 6)
        assert len(extra) <= 6 and all(q != s.question for q, _ in extra)
        if s.task == "read":
            assert extra == []
        shapes = s.meta.get("shapes", [])
        for q, a in extra:
            seen[s.task] += 1
            if a.startswith("<|object_ref_start|>"):           # the box of the one shape so described
                match = [sh for sh in shapes if (SHAPES_ZH[sh.kind] if s.lang == "zh" else sh.kind) in q
                         and (COLORS_ZH[sh.color] if s.lang == "zh" else sh.color) in q]
                assert len(match) == 1 and score("ground", a, a, s.image.size, match[0].box) == 1.0
            elif a.isdigit() and shapes:                           # a count of a kind present 1-5 times
                kind = next(k for k in SHAPES if (SHAPES_ZH[k] if s.lang == "zh" else k + "s") in q)
                assert 1 <= int(a) <= 5 and int(a) == sum(sh.kind == kind for sh in shapes)
            elif a in COLORS_ZH or a in COLORS_ZH.values():             # the colour of a kind present once
                kind = next(k for k in SHAPES if (SHAPES_ZH[k] if s.lang == "zh" else k) in q)
                (only,) = [sh for sh in shapes if sh.kind == kind]
                assert a == (COLORS_ZH[only.color] if s.lang == "zh" else only.color)
            elif s.task == "chart":
                label = next(lb for lb in s.meta["labels"] if lb in q)
                assert a == str(s.meta["values"][s.meta["labels"].index(label)])
        msgs = conversation(s, extra)
        assert msgs[0]["content"][1]["text"] == s.question and len(msgs) == 2 + 2 * len(extra)
        assert all("image" not in part for m in msgs[2:] for part in (m["content"] if isinstance(m["content"], list) else []))
    assert seen["count"] and seen["color"] and seen["ground"] and seen["chart"] and seen["table"]
