"""The word list with its train / held-out split, and the text-reading task.

The split is a hash of the word itself (crc32 % 10 == 0 is held out, about 10%), so it does not
depend on the file's order, on the machine or on the run; evaluation draws only held-out words.
"""

from __future__ import annotations

import functools
import random
import zlib

from PIL import Image, ImageDraw

from qwenvl.synthetic import fonts
from qwenvl.synthetic.style import (
    MAX_SIDE, MIN_SIDE, canvas_size, color_rgb, dark_ink, light_background, new_canvas)

HELDOUT_MOD = 10
SPLITS = ("train", "heldout")
MIN_TEXT_PX, MAX_TEXT_PX = 24, 64


def is_heldout(word: str) -> bool:
    return zlib.crc32(word.encode("utf-8")) % HELDOUT_MOD == 0


@functools.lru_cache(maxsize=1)
def all_words() -> tuple[str, ...]:
    """Every distinct word of the system word list (wamerican: ~104k, a third of them possessives)."""
    text = fonts.wordlist_path().read_text(encoding="utf-8", errors="ignore")
    return tuple(sorted({w.strip() for w in text.splitlines() if w.strip() and not w.strip().isspace()}))


@functools.lru_cache(maxsize=4)
def split_words(split: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(plain words, words with an apostrophe) of one split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    want = split == "heldout"
    words = [w for w in all_words() if is_heldout(w) == want]
    return tuple(w for w in words if "'" not in w), tuple(w for w in words if "'" in w)


@functools.lru_cache(maxsize=4)
def label_words(split: str) -> tuple[str, ...]:
    """Short lower-case words for chart and table labels."""
    plain, _ = split_words(split)
    return tuple(w for w in plain if 3 <= len(w) <= 7 and w.isascii() and w.isalpha() and w.islower())


def random_word(rng: random.Random, split: str) -> str:
    plain, apos = split_words(split)
    return rng.choice(apos if apos and rng.random() < 0.1 else plain)


def random_number(rng: random.Random) -> str:
    digits = rng.randint(1, 4)
    return str(rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1))


def random_text(rng: random.Random, split: str) -> str:
    """An English word (70%) or a number of 1 to 4 digits (30%)."""
    return random_word(rng, split) if rng.random() < 0.7 else random_number(rng)


def _fit_font(rng: random.Random, text: str, limit: int):
    """A random face and size (24-64 px) whose rendering of `text` is at most `limit` px wide."""
    face = rng.choice(fonts.text_fonts())
    size = rng.randint(MIN_TEXT_PX, MAX_TEXT_PX)
    while True:
        font = fonts.load_font(face, size)
        bbox = font.getbbox(text)
        if bbox[2] - bbox[0] <= limit or size <= MIN_TEXT_PX:
            return font, bbox
        size = max(MIN_TEXT_PX, int(size * 0.85))


def read_scene(rng: random.Random, split: str) -> tuple[Image.Image, str, tuple[int, int, int, int],
                                                      list[tuple[float, float]]]:
    """A word or number drawn once at a random place; returns (image, text, its pixel box, each character's
    horizontal span in pixels: where the pen starts and ends it, kerning included)."""
    text = random_text(rng, split)
    margin = rng.randint(4, 30)
    font, bbox = _fit_font(rng, text, MAX_SIDE - 2 * margin)
    tw, th = bbox[2] - bbox[0], bbox[3] - bbox[1]
    W, H = canvas_size(rng)
    W = max(W, min(MAX_SIDE, tw + 2 * margin), (H + 2) // 3)
    H = max(H, th + 2 * margin, (W + 2) // 3, MIN_SIDE)
    W, H = min(W, MAX_SIDE), min(H, MAX_SIDE)
    ink = dark_ink(rng) if rng.random() < 0.8 else color_rgb(rng, rng.choice(("red", "blue", "green", "purple")))
    img = new_canvas(rng, (W, H), light_background(rng))
    draw = ImageDraw.Draw(img)
    _decorate(rng, draw, (W, H))
    x = rng.randint(0, max(0, W - tw - 2 * margin)) + margin if W >= tw + 2 * margin else max(0, (W - tw) // 2)
    y = rng.randint(margin, max(margin, H - th - margin))
    draw.text((x - bbox[0], y - bbox[1]), text, font=font, fill=ink)
    pen = [font.getlength(text[:i]) for i in range(len(text) + 1)]
    spans = [(x - bbox[0] + pen[i], x - bbox[0] + pen[i + 1]) for i in range(len(text))]
    return img, text, (x, y, x + tw, y + th), spans


def _decorate(rng: random.Random, draw: ImageDraw.ImageDraw, size: tuple[int, int]) -> None:
    """Sometimes a faint frame or a couple of thin lines, so that text is not the only thing drawn."""
    W, H = size
    r = rng.random()
    if r < 0.15:
        g = rng.randint(120, 200)
        inset = rng.randint(0, 8)
        draw.rectangle([inset, inset, W - 1 - inset, H - 1 - inset], outline=(g, g, g), width=rng.randint(1, 3))
    elif r < 0.25:
        for _ in range(rng.randint(1, 2)):
            g = rng.randint(150, 215)
            y = rng.randint(0, H - 1)
            draw.line([(0, y), (W - 1, y)], fill=(g, g, g), width=1)
