"""Shape scenes for the counting, colour and grounding tasks.

A scene is a light canvas with non-overlapping circles, squares and triangles (each side >= 24 px),
filled or outlined, in the eight named colours. White shapes stay visible: they either get a dark
outline or the background is tinted visibly off-white.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from qwenvl.synthetic.style import (
    COLORS, canvas_size, color_rgb, distance, light_background, new_canvas)

SHAPES = ("circle", "square", "triangle")
SHAPES_ZH = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
COLORS_ZH = {"red": "红色", "green": "绿色", "blue": "蓝色", "yellow": "黄色",
             "black": "黑色", "white": "白色", "orange": "橙色", "purple": "紫色"}
MIN_SHAPE = 24      # px, the smallest side of any shape's box
GAP = 4             # px of background kept between any two shapes' boxes


@dataclass
class Shape:
    kind: str                       # circle | square | triangle
    color: str                      # one of COLORS
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels; x1/y1 exclusive (last pixel + 1)
    rgb: tuple[int, int, int] = (0, 0, 0)
    filled: bool = True
    width: int = 0                  # outline width; for a filled shape 0 means no outline
    outline_rgb: tuple[int, int, int] | None = None
    pointing_down: bool = False     # triangles only


def _place(rng: random.Random, size: tuple[int, int], dims: list[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """Non-overlapping boxes (with GAP between them) for shapes of the given (w, h); shrinks on crowding."""
    W, H = size
    for _attempt in range(8):
        boxes: list[tuple[int, int, int, int]] = []
        ok = True
        for w, h in dims:
            for _try in range(60):
                x0 = rng.randint(1, W - w - 1)
                y0 = rng.randint(1, H - h - 1)
                b = (x0, y0, x0 + w, y0 + h)
                if all(b[0] >= o[2] + GAP or o[0] >= b[2] + GAP or b[1] >= o[3] + GAP or o[1] >= b[3] + GAP
                       for o in boxes):
                    boxes.append(b)
                    break
            else:
                ok = False
                break
        if ok:
            return boxes
        # crowded: shrink everything by a fifth (never below the minimum) and start over
        dims = [(max(MIN_SHAPE, int(w * 0.8)), max(MIN_SHAPE, int(h * 0.8))) for w, h in dims]
    raise RuntimeError(f"could not place {len(dims)} shapes on a {W}x{H} canvas")


def _dims(rng: random.Random, kinds: list[str], size: tuple[int, int]) -> list[tuple[int, int]]:
    W, H = size
    n = len(kinds)
    smax = max(MIN_SHAPE + 2, min(min(W, H) * 0.4, 160, math.sqrt(W * H / n) * 0.55))
    # one scale per scene plus per-shape variation: some scenes have uniform sizes, some mixed
    spread = rng.choice((0.0, 0.3, 1.0))
    base = math.exp(rng.uniform(math.log(MIN_SHAPE), math.log(smax)))
    out = []
    for k in kinds:
        s = base if spread == 0 else math.exp(rng.uniform(math.log(MIN_SHAPE), math.log(smax)) * spread
                                              + math.log(base) * (1 - spread))
        s = max(MIN_SHAPE, min(int(smax), round(s)))
        h = s if k != "triangle" else max(MIN_SHAPE, round(s * rng.uniform(0.85, 1.0)))
        out.append((s, h))
    return out


def build_scene(rng: random.Random, specs: list[tuple[str, str]]) -> tuple[Image.Image, list[Shape]]:
    """Draw shapes given as (kind, colour) in a random layout and style; returns the image and shapes."""
    size = canvas_size(rng)
    kinds = [k for k, _ in specs]
    boxes = _place(rng, size, _dims(rng, kinds, size))
    style = rng.random()                 # all filled / all outlined / mixed per shape
    dark_outlines = rng.random() < 0.25  # filled shapes with a thin dark border
    shapes = []
    for (kind, color), box in zip(specs, boxes):
        filled = style < 0.5 or (style >= 0.75 and rng.random() < 0.5)
        sh = Shape(kind, color, box, color_rgb(rng, color), filled, pointing_down=rng.random() < 0.15)
        if filled:
            if dark_outlines or (color == "white" and rng.random() < 0.6):
                g = rng.randint(0, 90)
                sh.outline_rgb, sh.width = (g, g, g), rng.randint(1, 3)
        else:
            sh.width = rng.randint(2, 6) if color != "white" else rng.randint(3, 6)
        shapes.append(sh)
    # white with no dark border needs a visibly tinted background; others need contrast with it
    need_tint = any(s.color == "white" and s.outline_rgb is None for s in shapes)
    for _ in range(12):
        bg = light_background(rng, tinted=need_tint)
        if all(distance(bg, s.rgb) >= 90 for s in shapes if s.color != "white"):
            break
    else:
        bg = (236, 236, 236) if need_tint else (255, 255, 255)
    img = new_canvas(rng, size, bg)
    draw = ImageDraw.Draw(img)
    for s in shapes:
        draw_shape(draw, s)
    return img, shapes


def triangle_points(s: Shape) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = s.box
    cx = (x0 + x1 - 1) / 2
    if s.pointing_down:
        return [(x0, y0), (x1 - 1, y0), (cx, y1 - 1)]
    return [(cx, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)]


def draw_shape(draw: ImageDraw.ImageDraw, s: Shape) -> None:
    x0, y0, x1, y1 = s.box
    xy = [x0, y0, x1 - 1, y1 - 1]     # PIL boxes are inclusive
    if s.filled:
        fill, outline, width = s.rgb, s.outline_rgb, max(s.width, 1)
    else:
        fill, outline, width = None, s.rgb, s.width
    if s.kind == "circle":
        draw.ellipse(xy, fill=fill, outline=outline, width=width)
    elif s.kind == "square":
        draw.rectangle(xy, fill=fill, outline=outline, width=width)
    else:
        draw.polygon(triangle_points(s), fill=fill, outline=outline, width=width)


def _other_kinds(rng: random.Random, exclude: str, n: int) -> list[str]:
    return [rng.choice([k for k in SHAPES if k != exclude]) for _ in range(n)]


def count_scene(rng: random.Random) -> tuple[Image.Image, list[Shape], str, int]:
    """1-5 shapes of one kind beside 0-3 shapes of other kinds; returns (image, shapes, kind, count)."""
    kind = rng.choice(SHAPES)
    k = rng.randint(1, 5)
    one_color = rng.random() < 0.3
    c = rng.choice(COLORS)
    specs = [(kind, c if one_color else rng.choice(COLORS)) for _ in range(k)]
    specs += [(o, rng.choice(COLORS)) for o in _other_kinds(rng, kind, rng.randint(0, 3))]
    rng.shuffle(specs)
    img, shapes = build_scene(rng, specs)
    return img, shapes, kind, k


def color_scene(rng: random.Random) -> tuple[Image.Image, list[Shape], Shape]:
    """One shape whose kind is unique in the scene, beside 0-3 shapes of other kinds."""
    kind = rng.choice(SHAPES)
    specs = [(kind, rng.choice(COLORS))] + [(o, rng.choice(COLORS)) for o in _other_kinds(rng, kind, rng.randint(0, 3))]
    rng.shuffle(specs)
    img, shapes = build_scene(rng, specs)
    return img, shapes, next(s for s in shapes if s.kind == kind)


def ground_scene(rng: random.Random) -> tuple[Image.Image, list[Shape], Shape]:
    """A target whose (colour, kind) pair is unique, beside 0-4 distractors, many sharing its kind or colour."""
    kind, color = rng.choice(SHAPES), rng.choice(COLORS)
    specs = [(kind, color)]
    for _ in range(rng.randint(0, 4)):
        r = rng.random()
        if r < 0.35:
            d = (kind, rng.choice([c for c in COLORS if c != color]))
        elif r < 0.6:
            d = (rng.choice([k for k in SHAPES if k != kind]), color)
        else:
            d = (rng.choice(SHAPES), rng.choice(COLORS))
            if d == (kind, color):
                d = (kind, rng.choice([c for c in COLORS if c != color]))
        specs.append(d)
    rng.shuffle(specs)
    img, shapes = build_scene(rng, specs)
    return img, shapes, next(s for s in shapes if (s.kind, s.color) == (kind, color))
