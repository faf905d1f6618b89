"""Shared drawing style for the synthetic tasks: canvas sizes, light backgrounds, named colours, ink.

Every function takes the sample's `random.Random` so that a sample is a pure function of its seed.
Styles are varied on purpose (several shades per colour name, tinted and gradient backgrounds, faint
noise) because the hidden evaluation draws the same task families in a style of its own.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

MIN_SIDE, MAX_SIDE, MAX_RATIO = 200, 600, 3.0

# Several shades per colour name: our own, the CSS/X11 named colour, matplotlib's tab10 where it has one.
COLOR_SHADES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "red": ((255, 0, 0), (220, 40, 40), (214, 39, 40), (200, 25, 45), (230, 50, 30)),
    "green": ((0, 128, 0), (0, 190, 0), (44, 160, 44), (40, 170, 80), (30, 140, 60)),
    "blue": ((0, 0, 255), (31, 119, 180), (40, 80, 220), (30, 60, 170), (20, 100, 230)),
    "yellow": ((255, 255, 0), (255, 215, 0), (240, 205, 30), (250, 230, 50), (255, 235, 0)),
    "black": ((0, 0, 0), (25, 25, 25), (45, 45, 50)),
    "white": ((255, 255, 255), (252, 252, 250), (248, 248, 248)),
    "orange": ((255, 165, 0), (255, 127, 14), (245, 130, 30), (255, 140, 0), (240, 150, 40)),
    "purple": ((128, 0, 128), (148, 103, 189), (140, 50, 180), (110, 40, 160), (160, 32, 240)),
}
COLORS = tuple(COLOR_SHADES)
JITTER = {"white": 4, "black": 12}   # per-channel jitter; others get DEFAULT_JITTER
DEFAULT_JITTER = 14


def clamp(v: float) -> int:
    return 0 if v < 0 else 255 if v > 255 else int(v)


def color_rgb(rng: random.Random, name: str) -> tuple[int, int, int]:
    """A shade of the named colour, jittered a little (white stays near-white)."""
    base = rng.choice(COLOR_SHADES[name])
    j = JITTER.get(name, DEFAULT_JITTER)
    if name == "white":
        return tuple(clamp(c - rng.randint(0, j)) for c in base)  # type: ignore[return-value]
    return tuple(clamp(c + rng.randint(-j, j)) for c in base)  # type: ignore[return-value]


def canvas_size(rng: random.Random) -> tuple[int, int]:
    """(W, H), each side in [200, 600] and aspect ratio at most 3:1 either way (guaranteed by the sides)."""
    mode = rng.random()
    if mode < 0.45:                       # anything in range
        return rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)
    if mode < 0.75:                       # near square
        w = rng.randint(MIN_SIDE, MAX_SIDE)
        h = max(MIN_SIDE, min(MAX_SIDE, round(w * rng.uniform(0.85, 1.15))))
        return w, h
    short, long = rng.randint(MIN_SIDE, 280), rng.randint(420, MAX_SIDE)   # wide or tall extremes
    return (long, short) if rng.random() < 0.5 else (short, long)


def light_background(rng: random.Random, tinted: bool = False) -> tuple[int, int, int]:
    """A light colour: near white, a pale tint or a light grey; `tinted` keeps it visibly off-white."""
    for _ in range(20):
        bg = _light_background(rng, tinted)
        if not tinted or distance(bg, (255, 255, 255)) >= 40:
            return bg
    return (218, 218, 218)


def _light_background(rng: random.Random, tinted: bool) -> tuple[int, int, int]:
    mode = rng.random()
    if not tinted and mode < 0.4:
        v = rng.randint(244, 255)
        return (v, v, v)
    if mode < 0.7 or tinted and mode < 0.8:
        # a pale tint: mix a random hue with white
        hue = [rng.randint(0, 255) for _ in range(3)]
        a = rng.uniform(0.08, 0.22) if not tinted else rng.uniform(0.15, 0.3)
        return tuple(clamp(255 * (1 - a) + h * a) for h in hue)  # type: ignore[return-value]
    v = rng.randint(205, 232) if tinted else rng.randint(215, 245)
    return (v, v, v)


def luminance(rgb: tuple[int, int, int]) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5


def dark_ink(rng: random.Random) -> tuple[int, int, int]:
    """A text colour readable on a light background (black, greys, navy, dark red, dark green ...)."""
    if rng.random() < 0.5:
        v = rng.randint(0, 60)
        return (v, v, v)
    for _ in range(20):
        c = tuple(rng.randint(0, 150) for _ in range(3))
        if luminance(c) < 90:  # type: ignore[arg-type]
            return c  # type: ignore[return-value]
    return (0, 0, 0)


def new_canvas(rng: random.Random, size: tuple[int, int], bg: tuple[int, int, int]) -> Image.Image:
    """A canvas of `bg`, sometimes with a soft gradient or faint noise (never strong enough to hide ink)."""
    w, h = size
    mode = rng.random()
    if mode < 0.7:
        return Image.new("RGB", size, bg)
    if mode < 0.85:   # vertical or horizontal gradient from bg towards a slightly different light colour
        other = tuple(clamp(c + rng.randint(-18, 10)) for c in bg)
        ramp = Image.linear_gradient("L")                     # 256x256, 0 at the top
        if rng.random() < 0.5:
            ramp = ramp.rotate(90)
        ramp = ramp.resize(size)
        return Image.composite(Image.new("RGB", size, other), Image.new("RGB", size, bg), ramp)
    g = np.random.default_rng(rng.getrandbits(63))
    amp = rng.randint(3, 9)
    noise = g.integers(-amp, amp + 1, size=(h, w, 1), dtype=np.int16)
    arr = np.clip(np.asarray(bg, dtype=np.int16)[None, None, :] + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")
