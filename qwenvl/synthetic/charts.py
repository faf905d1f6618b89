"""Bar charts ("What is the value of {label}?") and small tables ("What is the {col} of {row}?").

Bars: 2-6 of them, short word labels, integer values, a value axis with ticks and grid lines, and the
value written at the bar's end in about half the charts (otherwise it is read off the axis, which the
5% relaxed accuracy allows). Vertical or horizontal. Tables: 2-4 rows by 2-4 columns of integers.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from qwenvl.synthetic import fonts
from qwenvl.synthetic.style import (
    COLORS, MAX_SIDE, MIN_SIDE, color_rgb, dark_ink, light_background, new_canvas)
from qwenvl.synthetic.text import label_words

SCALES = (5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def _labels(rng: random.Random, split: str, n: int, max_len: int = 7) -> list[str]:
    words = label_words(split)
    out: list[str] = []
    while len(out) < n:
        w = rng.choice(words)
        if len(w) <= max_len and w not in out:
            out.append(w.capitalize() if rng.random() < 0.2 else w)
    return out


def _nice_step(top: float) -> int:
    """A 1/2/5 x 10^k step giving 4 to 8 ticks up to `top`."""
    raw = top / 5
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if m * mag >= raw:
            return max(1, int(m * mag))
    return max(1, int(10 * mag))


def _text_w(font, s: str) -> int:
    b = font.getbbox(s)
    return b[2] - b[0]


@dataclass
class _Chart:
    """A bar chart's content and text metrics (what the layout and the drawing need)."""
    labels: list[str]
    values: list[int]
    horizontal: bool
    written: bool                 # values printed at the bars' ends
    font: object
    fsize: int
    lab_w: int                    # widest label
    axis_top: int
    ticks: list[int]

    @property
    def tick_w(self) -> int:
        return max(_text_w(self.font, str(t)) for t in self.ticks)

    @property
    def baseline(self) -> int:
        return self.font.getbbox("0")[1]

    @property
    def text_h(self) -> int:
        fb = self.font.getbbox("0")
        return fb[3] - fb[1]


def chart_scene(rng: random.Random, split: str) -> tuple[Image.Image, list[str], list[int], bool]:
    """Returns (image, labels, values, values_written)."""
    chart = _chart_content(rng, split)
    (W, H), plot = _chart_frame(rng, chart)
    img = new_canvas(rng, (W, H), light_background(rng))
    draw = ImageDraw.Draw(img)
    ink = dark_ink(rng)
    grid = rng.random() < 0.6
    gc = rng.randint(200, 230)
    _draw_ticks(draw, chart, plot, ink, (gc, gc, gc) if grid else None)
    _draw_bars(rng, draw, chart, plot, ink)
    x0, y0, x1, y1 = plot
    draw.line([(x0, y0), (x0, y1)], fill=ink, width=1)          # axes
    draw.line([(x0, y1), (x1, y1)], fill=ink, width=1)
    return img, chart.labels, chart.values, chart.written


def _chart_content(rng: random.Random, split: str) -> _Chart:
    """Values, labels and a font small enough for the labels to fit side by side; the value axis."""
    n = rng.randint(2, 6)
    scale = rng.choice(SCALES)
    lo = 0 if rng.random() < 0.7 else scale // 10
    values = [rng.randint(max(1, lo), scale) for _ in range(n)]
    horizontal = rng.random() < 0.25
    written = rng.random() < 0.5
    face = rng.choice(fonts.latin_fonts())
    fsize = rng.randint(11, 17)
    labels = _labels(rng, split, n, max_len=7 if n <= 4 else 5)
    for _ in range(4):   # shrink the text until the labels fit side by side
        font = fonts.load_font(face, fsize)
        lab_w = max(_text_w(font, s) for s in labels)
        if horizontal or n * (lab_w + 8) + 60 <= MAX_SIDE:
            break
        fsize = max(9, fsize - 2)
    top = max(values)
    step = _nice_step(top)
    axis_top = step * math.ceil(top / step)
    if rng.random() < 0.3 and axis_top == top:
        axis_top += step
    return _Chart(labels, values, horizontal, written, font, fsize, lab_w, axis_top,
                  list(range(0, axis_top + 1, step)))


def _chart_frame(rng: random.Random, c: _Chart) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Canvas size and the plot area (x0, y0, x1, y1) inside its margins."""
    n, tick_w, text_h = len(c.labels), c.tick_w, c.text_h
    need_w = (c.lab_w + tick_w + 160) if c.horizontal else (n * (c.lab_w + 8) + tick_w + 30)
    need_h = (n * (text_h + 14) + 60) if c.horizontal else MIN_SIDE
    W = rng.randint(min(max(MIN_SIDE, need_w), MAX_SIDE), MAX_SIDE)
    H = rng.randint(min(max(MIN_SIDE, need_h, (W + 2) // 3), MAX_SIDE), MAX_SIDE)
    W = max(W, (H + 2) // 3)
    bottom = c.fsize + 14
    if c.horizontal:
        right = rng.randint(12, 24) + tick_w // 2 + (_text_w(c.font, str(c.axis_top)) if c.written else 0)
        left, top_m = c.lab_w + 14, rng.randint(10, 30)
    else:
        left, right = tick_w + 14, rng.randint(8, 24)
        top_m = text_h + rng.randint(10, 30)
    return (W, H), (left, top_m, W - right, H - bottom)


def _draw_ticks(draw, c: _Chart, plot, ink, grid_color) -> None:
    x0, y0, x1, y1 = plot
    length = (x1 - x0) if c.horizontal else (y1 - y0)
    for t in c.ticks:
        p = round(t / c.axis_top * length)
        s = str(t)
        if c.horizontal:
            x = x0 + p
            if grid_color and t:
                draw.line([(x, y0), (x, y1)], fill=grid_color)
            draw.line([(x, y1), (x, y1 + 4)], fill=ink)
            draw.text((x - _text_w(c.font, s) / 2, y1 + 6), s, font=c.font, fill=ink)
        else:
            y = y1 - p
            if grid_color and t:
                draw.line([(x0, y), (x1, y)], fill=grid_color)
            draw.line([(x0 - 4, y), (x0, y)], fill=ink)
            draw.text((x0 - 6 - _text_w(c.font, s), y - c.text_h / 2 - c.baseline), s, font=c.font, fill=ink)


def _draw_bars(rng: random.Random, draw, c: _Chart, plot, ink) -> None:
    x0, y0, x1, y1 = plot
    one_color = rng.random() < 0.6
    base = color_rgb(rng, rng.choice([k for k in COLORS if k not in ("white", "yellow")]))
    length = (x1 - x0) if c.horizontal else (y1 - y0)
    slot = ((y1 - y0) if c.horizontal else (x1 - x0)) / len(c.labels)
    bar = slot * rng.uniform(0.45, 0.8)
    text_h, fb1, font = c.text_h, c.baseline, c.font
    for i, (lab, v) in enumerate(zip(c.labels, c.values)):
        color = base if one_color else color_rgb(rng, rng.choice([k for k in COLORS if k != "white"]))
        p = round(v / c.axis_top * length)
        mid = (y0 if c.horizontal else x0) + slot * (i + 0.5)
        if c.horizontal:
            draw.rectangle([x0, mid - bar / 2, x0 + p, mid + bar / 2], fill=color)
            draw.text((x0 - 6 - _text_w(font, lab), mid - text_h / 2 - fb1), lab, font=font, fill=ink)
            if c.written:
                draw.text((x0 + p + 4, mid - text_h / 2 - fb1), str(v), font=font, fill=ink)
        else:
            draw.rectangle([mid - bar / 2, y1 - p, mid + bar / 2, y1], fill=color)
            draw.text((mid - _text_w(font, lab) / 2, y1 + 6), lab, font=font, fill=ink)
            if c.written:
                draw.text((mid - _text_w(font, str(v)) / 2, y1 - p - text_h - 4 - fb1), str(v), font=font, fill=ink)


def table_scene(rng: random.Random, split: str) -> tuple[Image.Image, list[str], list[str], list[list[str]]]:
    """Returns (image, row names, column names, cells[row][col])."""
    nr, nc = rng.randint(2, 4), rng.randint(2, 4)
    names = _labels(rng, split, nr + nc, max_len=7 if nc <= 3 else 6)
    rows, cols = names[:nr], names[nr:]
    digits = rng.randint(1, 4)
    cells = [[str(rng.randint(0, 10 ** rng.randint(1, digits) - 1)) for _ in range(nc)] for _ in range(nr)]
    t = _fit_table(rng, rows, cols, cells)
    W = rng.randint(max(MIN_SIDE, t.width + 20), MAX_SIDE) if t.width + 20 < MAX_SIDE else MAX_SIDE
    H = rng.randint(max(MIN_SIDE, t.height + 20, (W + 2) // 3), MAX_SIDE)
    W = max(W, (H + 2) // 3)
    ox = rng.randint(10, max(10, W - t.width - 10))
    oy = rng.randint(10, max(10, H - t.height - 10))
    img = new_canvas(rng, (W, H), light_background(rng))
    _draw_table(rng, ImageDraw.Draw(img), t, ox, oy, rows, cols, cells)
    return img, rows, cols, cells


@dataclass
class _TableMetrics:
    font: object
    pad: int
    col_w: list[int]
    head_w: int                   # the row-name column
    row_h: int
    baseline: int
    n_rows: int

    @property
    def width(self) -> int:
        return self.head_w + sum(self.col_w)

    @property
    def height(self) -> int:
        return self.row_h * (self.n_rows + 1)


def _fit_table(rng: random.Random, rows, cols, cells) -> _TableMetrics:
    """A font and cell padding small enough for the table to fit the widest canvas."""
    face = rng.choice(fonts.latin_fonts())
    fsize = rng.randint(12, 22)
    pad = rng.randint(5, 12)
    for _ in range(6):
        font = fonts.load_font(face, fsize)
        col_w = [max(_text_w(font, s) for s in [c] + [r[j] for r in cells]) + 2 * pad for j, c in enumerate(cols)]
        head_w = max(_text_w(font, r) for r in rows) + 2 * pad
        if head_w + sum(col_w) + 20 <= MAX_SIDE:
            break
        fsize, pad = max(10, fsize - 2), max(3, pad - 2)
    fb = font.getbbox("Ag0")
    return _TableMetrics(font, pad, col_w, head_w, fb[3] - fb[1] + 2 * pad, fb[1], len(rows))


def _draw_table(rng: random.Random, draw, t: _TableMetrics, ox: int, oy: int, rows, cols, cells) -> None:
    nr, nc, pad, row_h = len(rows), len(cols), t.pad, t.row_h
    ink = dark_ink(rng)
    lines = rng.choice(("grid", "rules", "none", "header"))
    lc = rng.randint(0, 140)
    if rng.random() < 0.4:   # shaded header row
        g = rng.randint(205, 235)
        draw.rectangle([ox, oy, ox + t.width, oy + row_h], fill=(g, g, g))
    xs = [ox, ox + t.head_w]
    for w in t.col_w:
        xs.append(xs[-1] + w)
    right_align = rng.random() < 0.5
    for i in range(nr + 1):
        y = oy + i * row_h
        for j in range(nc + 1):
            s = (([""] + cols) if i == 0 else ([rows[i - 1]] + cells[i - 1]))[j]
            if not s:
                continue
            w = _text_w(t.font, s)
            x = xs[j + 1] - pad - w if j > 0 and i > 0 and right_align else xs[j] + pad
            draw.text((x, y + pad - t.baseline), s, font=t.font, fill=ink)
    c = (lc, lc, lc)
    if lines == "grid":
        for i in range(nr + 2):
            draw.line([(ox, oy + i * row_h), (ox + t.width, oy + i * row_h)], fill=c)
        for x in xs:
            draw.line([(x, oy), (x, oy + t.height)], fill=c)
    elif lines == "rules":
        for i in (0, 1, nr + 1):
            draw.line([(ox, oy + i * row_h), (ox + t.width, oy + i * row_h)], fill=c, width=1 + (i != 1))
    elif lines == "header":
        draw.line([(ox, oy + row_h), (ox + t.width, oy + row_h)], fill=c)
        draw.line([(xs[1], oy), (xs[1], oy + t.height)], fill=c)
