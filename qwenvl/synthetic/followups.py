"""Follow-up questions about an image already drawn, for training conversations of several turns.

On a CPU most of a training step is the vision tower (its attention grows with the square of the
patch count), while an answer is a few tokens. Asking several questions about one image pays the
vision cost once for all of them. The follow-ups come from what the scene holds, and every one is
unambiguous: counts of 1 to 5, the colour of a kind present once, the box of a (colour, kind) pair
present once, the other bars of a chart, the other cells of a table. Reading scenes hold one text,
so they get none.

The first turn stays exactly the single question that evaluation asks, so a model trained this way
is asked and scored in the single-turn form.
"""

from __future__ import annotations

import random
from collections import Counter

from qwenvl.synthetic import (GROUND_LABELS, QUESTIONS, Sample, color_name, grounding_answer,
                                       messages, shape_name)

MAX_COUNT = 5     # the task's range: counts of 1 to 5 of the asked shape


def followups(sample: Sample, rng: random.Random, limit: int) -> list[tuple[str, str]]:
    """Up to `limit` (question, answer) pairs about `sample.image` other than its own question."""
    lang, meta = sample.lang, sample.meta
    pairs: list[tuple[str, str]] = []
    if "shapes" in meta:
        shapes = meta["shapes"]
        kinds = Counter(s.kind for s in shapes)
        kinds_colors = Counter((s.kind, s.color) for s in shapes)
        for kind, n in kinds.items():
            if n <= MAX_COUNT:
                pairs.append((QUESTIONS[("count", lang)].format(shape=shape_name(kind, lang)), str(n)))
        for s in shapes:
            k, c = shape_name(s.kind, lang), color_name(s.color, lang)
            if kinds[s.kind] == 1:
                pairs.append((QUESTIONS[("color", lang)].format(shape=k), c))
            if kinds_colors[(s.kind, s.color)] == 1:
                label = GROUND_LABELS[lang].format(color=c, shape=k)
                pairs.append((QUESTIONS[("ground", lang)].format(color=c, shape=k),
                              grounding_answer(label, s.box, sample.image.size)))
    elif sample.task == "chart":
        pairs = [(QUESTIONS[("chart", lang)].format(label=label), str(value))
                 for label, value in zip(meta["labels"], meta["values"])]
    elif sample.task == "table":
        q = QUESTIONS[("table", lang)]
        pairs = [(q.format(row=row, col=col), meta["cells"][r][c])
                 for r, row in enumerate(meta["rows"]) for c, col in enumerate(meta["cols"])]
    pairs = [p for p in pairs if p[0] != sample.question]
    rng.shuffle(pairs)
    return pairs[:limit]


def conversation(sample: Sample, extra: list[tuple[str, str]]) -> list[dict]:
    """The sample's own turn (image and question), its answer, then each follow-up as a text-only turn."""
    msgs = messages(sample)
    for question, answer in extra:
        msgs += [{"role": "user", "content": [{"text": question}]}, {"role": "assistant", "content": answer}]
    return msgs
