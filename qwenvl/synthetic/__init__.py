"""Synthetic visual question answering, drawn on the fly and deterministically from (seed, index).

Task families (English and Chinese questions):
    count   "How many circles are there?"        -> "3"
    color   "What color is the square?"          -> "red"              (zh answers: 红色 ...)
    ground  "Locate the red circle."             -> "<|object_ref_start|>the red circle<|object_ref_end|>
                                                     <|box_start|>(x1,y1),(x2,y2)<|box_end|>" on a 0..1000 grid
    read    "What is written in the image?"      -> the word or number
    chart   "What is the value of {label}?"      -> the bar's integer value
    table   "What is the {col} of {row}?"        -> the cell

`make_sample(seed, i)` is a pure function: the same arguments give the same pixels on one machine
(same fonts, same Pillow). Nothing is cached on disk, so worker processes can draw any index.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageFilter

from qwenvl.synthetic.charts import chart_scene, table_scene
from qwenvl.synthetic.scenes import COLORS_ZH, SHAPES, SHAPES_ZH, color_scene, count_scene, ground_scene
from qwenvl.synthetic.style import COLORS
from qwenvl.synthetic.text import SPLITS, read_scene

TASKS = ("count", "color", "ground", "read", "chart", "table")
LANGS = ("en", "zh")
# The default mixture when no task is asked for: grounding and reading are the hardest to learn.
TASK_WEIGHTS = {"count": 0.17, "color": 0.13, "ground": 0.25, "read": 0.2, "chart": 0.13, "table": 0.12}
ZH_FRACTION = 0.3
BLUR_FRACTION = 0.12   # a soft (anti-aliased / rescaled looking) copy now and then

# The grounding label and the request around it; the bundled model's generation_config.json declares the
# request (qwenvl.grounding.declared_grounding_prompt), so `LLM.ground` asks as the model was trained.
GROUND_LABELS = {"en": "the {color} {shape}", "zh": "{color}的{shape}"}
GROUND_REQUESTS = {"en": "Locate {description}.", "zh": "找到{description}。"}

QUESTIONS = {
    ("count", "en"): "How many {shape}s are there?",
    ("count", "zh"): "图中有几个{shape}？",
    ("color", "en"): "What color is the {shape}?",
    ("color", "zh"): "{shape}是什么颜色？",
    ("ground", "en"): GROUND_REQUESTS["en"].format(description=GROUND_LABELS["en"]),
    ("ground", "zh"): GROUND_REQUESTS["zh"].format(description=GROUND_LABELS["zh"]),
    ("read", "en"): "What is written in the image?",
    ("read", "zh"): "图中写的是什么？",
    ("chart", "en"): "What is the value of {label}?",
    ("chart", "zh"): "{label}的数值是多少？",
    ("table", "en"): "What is the {col} of {row}?",
    ("table", "zh"): "{row}的{col}是多少？",
}


@dataclass
class Sample:
    image: Image.Image
    question: str
    answer: str
    task: str
    lang: str
    boxes: list[tuple[int, int, int, int]] | None = None   # grounding: target box in pixels, x2/y2 exclusive
    meta: dict[str, Any] = field(default_factory=dict)      # what was drawn (for tests and debugging)


def to_grid(box: tuple[float, float, float, float], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixels of the original image -> Qwen2-VL's 0..1000 grid: x = round(px / W * 1000)."""
    W, H = size
    x1, y1, x2, y2 = box
    return round(x1 / W * 1000), round(y1 / H * 1000), round(x2 / W * 1000), round(y2 / H * 1000)


def grounding_answer(label: str, box: tuple[float, float, float, float], size: tuple[int, int]) -> str:
    """The Qwen2-VL grounding string for one box given in pixels of an image of `size`."""
    x1, y1, x2, y2 = to_grid(box, size)
    return (f"<|object_ref_start|>{label}<|object_ref_end|>"
            f"<|box_start|>({x1},{y1}),({x2},{y2})<|box_end|>")


def shape_name(shape: str, lang: str) -> str:
    return SHAPES_ZH[shape] if lang == "zh" else shape


def color_name(color: str, lang: str) -> str:
    return COLORS_ZH[color] if lang == "zh" else color


def _rng(seed: int, index: int, task: str | None, lang: str | None, split: str) -> random.Random:
    # Seeding from a string goes through sha512: stable across processes and PYTHONHASHSEED.
    return random.Random(f"qwenvl-synth/{seed}/{index}/{split}/{task}/{lang}")


def make_sample(seed: int, index: int, task: str | None = None, lang: str | None = None,
                split: str = "train") -> Sample:
    """Draw sample `index` of stream `seed`; `task`/`lang` None picks them from the default mixture.

    `split="heldout"` draws words (reading, chart and table labels) only from the held-out part of the
    word list, and images independent of the train split's for the same seed and index.
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if lang is not None and lang not in LANGS:
        raise ValueError(f"unknown lang {lang!r}; expected one of {LANGS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = _rng(seed, index, task, lang, split)
    if task is None:
        task = rng.choices(TASKS, weights=[TASK_WEIGHTS[t] for t in TASKS])[0]
    if lang is None:
        lang = "zh" if rng.random() < ZH_FRACTION else "en"
    q = QUESTIONS[(task, lang)]
    boxes = None
    meta: dict[str, Any] = {}
    if task == "count":
        img, shapes, kind, k = count_scene(rng)
        question, answer = q.format(shape=shape_name(kind, lang)), str(k)
        meta.update(shapes=shapes, kind=kind)
    elif task == "color":
        img, shapes, target = color_scene(rng)
        question, answer = q.format(shape=shape_name(target.kind, lang)), color_name(target.color, lang)
        meta.update(shapes=shapes, target=target)
    elif task == "ground":
        img, shapes, target = ground_scene(rng)
        c, s = color_name(target.color, lang), shape_name(target.kind, lang)
        question = q.format(color=c, shape=s)
        answer = grounding_answer(GROUND_LABELS[lang].format(color=c, shape=s), target.box, img.size)
        boxes = [target.box]
        meta.update(shapes=shapes, target=target)
    elif task == "read":
        img, text, box, spans = read_scene(rng, split)
        question, answer = q, text
        meta.update(text_box=box, char_spans=spans)
    elif task == "chart":
        img, labels, values, written = chart_scene(rng, split)
        i = rng.randrange(len(labels))
        question, answer = q.format(label=labels[i]), str(values[i])
        meta.update(labels=labels, values=values, written=written)
    else:
        img, rows, cols, cells = table_scene(rng, split)
        r, c = rng.randrange(len(rows)), rng.randrange(len(cols))
        question, answer = q.format(row=rows[r], col=cols[c]), cells[r][c]
        meta.update(rows=rows, cols=cols, cells=cells)
    if rng.random() < BLUR_FRACTION:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.0)))
        meta["blurred"] = True
    return Sample(img, question, answer, task, lang, boxes, meta)


def messages(sample: Sample) -> list[dict[str, Any]]:
    """The sample as a DashScope-style conversation: user (image, question), assistant (answer)."""
    return [
        {"role": "user", "content": [{"image": sample.image}, {"text": sample.question}]},
        {"role": "assistant", "content": sample.answer},
    ]


class SyntheticDataset:
    """Index -> Sample over one seed, usable as a map-style dataset by any loader (no torch needed).

    `tasks`/`langs` restrict the mixture; with several tasks given, each index picks one uniformly.
    """

    def __init__(self, seed: int, length: int, split: str = "train",
                 tasks: tuple[str, ...] | None = None, langs: tuple[str, ...] | None = None):
        self.seed, self.length, self.split = seed, length, split
        self.tasks, self.langs = tasks, langs

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.length:
            raise IndexError(index)
        pick = random.Random(f"qwenvl-synth-pick/{self.seed}/{index}")
        task = pick.choice(self.tasks) if self.tasks else None
        lang = pick.choice(self.langs) if self.langs else None
        return make_sample(self.seed, index, task, lang, self.split)


__all__ = ["COLORS", "LANGS", "QUESTIONS", "SHAPES", "Sample", "SyntheticDataset", "TASKS",
           "grounding_answer", "make_sample", "messages", "to_grid"]
