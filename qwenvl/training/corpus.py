"""Texts for training the bundled model's tokenizer, and `build_tokenizer()` that trains and saves it.

The corpus is everything the synthetic tasks can say: every word of the word list (both splits, so that
held-out words are short token sequences too), the questions and answers of every task in English and
Chinese, the grounding strings' inner text (the special tokens themselves are added after training, so
the corpus leaves them out), numbers, and the chat template's own words. No image is drawn.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

from qwenvl.synthetic import GROUND_LABELS, QUESTIONS, TASKS
from qwenvl.synthetic.scenes import COLORS_ZH, SHAPES, SHAPES_ZH
from qwenvl.synthetic.style import COLORS
from qwenvl.synthetic.text import all_words, label_words
from qwenvl.training.tokenizer_train import default_chat_template, save_tokenizer, train_tokenizer

DEFAULT_VOCAB_SIZE = 5000
# The fixed pieces of the Chinese questions, learnt as words of their own (see corpus()).
ZH_PARTS = ("图中有几个", "是什么颜色", "找到", "的", "图中写的是什么", "数值是多少", "是多少", "？", "。")
ZH_WHOLE_EVERY = 50
TEMPLATE_TEXTS = (
    "system\nYou are a helpful assistant.", "user\n", "assistant\n", "Picture 1: ", "Video 1: ",
)


def _box_text(rng: random.Random) -> str:
    x1, y1 = rng.randint(0, 900), rng.randint(0, 900)
    return f"({x1},{y1}),({rng.randint(x1, 1000)},{rng.randint(y1, 1000)})"


def corpus(seed: int = 0, repeats: int = 200) -> Iterator[str]:
    """Yield the tokenizer training texts (deterministic for a seed)."""
    rng = random.Random(f"qwenvl-corpus/{seed}")
    words = all_words()
    labels = label_words("train") + label_words("heldout")
    # every dictionary word, bare as in an answer and once inside a sentence (with its leading space)
    yield from words
    for i in range(0, len(words), 16):
        yield "The words " + " ".join(words[i:i + 16]) + "."
    # Chinese runs of letters are single pre-tokens, so frequent whole questions would each become one
    # token ("找到红色的圆形") and the model could not compose colour and shape. The parts come often,
    # the whole questions rarely, so that BPE merges stop at the parts.
    zh_parts = list(COLORS_ZH.values()) + list(SHAPES_ZH.values()) + list(ZH_PARTS)
    for i in range(repeats):
        yield from TEMPLATE_TEXTS
        yield from zh_parts
        for shape in SHAPES:
            color = rng.choice(COLORS)
            yield QUESTIONS[("count", "en")].format(shape=shape)
            yield QUESTIONS[("color", "en")].format(shape=shape)
            yield QUESTIONS[("ground", "en")].format(color=color, shape=shape)
            yield GROUND_LABELS["en"].format(color=color, shape=shape) + _box_text(rng)
            yield color
            yield _box_text(rng)
        yield QUESTIONS[("read", "en")]
        yield QUESTIONS[("chart", "en")].format(label=rng.choice(labels))
        yield QUESTIONS[("table", "en")].format(row=rng.choice(labels), col=rng.choice(labels))
        yield str(rng.randint(0, 9999))
        if i % ZH_WHOLE_EVERY == 0:
            shape, color = SHAPES_ZH[rng.choice(SHAPES)], COLORS_ZH[rng.choice(COLORS)]
            for (task, lang), q in QUESTIONS.items():
                if lang == "zh":
                    yield q.format(shape=shape, color=color, label=rng.choice(labels),
                                   row=rng.choice(labels), col=rng.choice(labels))
            yield GROUND_LABELS["zh"].format(color=color, shape=shape) + _box_text(rng)


def build_tokenizer(out_dir: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE, family: str = "qwen2_vl",
                    seed: int = 0) -> dict[str, int]:
    """Train the BPE tokenizer on `corpus()` and save it (tokenizer.json, tokenizer_config.json,
    chat_template.jinja) in `out_dir`; returns the special token ids (they follow the BPE tokens)."""
    tok = train_tokenizer(corpus(seed), vocab_size)
    return save_tokenizer(tok, out_dir, default_chat_template(family))


__all__ = ["DEFAULT_VOCAB_SIZE", "TASKS", "build_tokenizer", "corpus"]
