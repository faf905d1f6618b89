"""draw_boxes checked pixel by pixel: edges where expected, interiors untouched, labels on tags,
CJK fonts when installed and a crash-free path when no font is found."""

import os

import numpy as np
import pytest
from PIL import Image, ImageFont

from qwenvl.answers import drawing
from qwenvl.answers.drawing import PALETTE, draw_boxes, find_font
from qwenvl.answers.grounding import parse_boxes

WHITE = (255, 255, 255)


def px(img, x, y):
    return img.getpixel((x, y))


def test_box_edges_interior_and_outside():
    img = Image.new("RGB", (200, 160), WHITE)
    out = draw_boxes(img, [{"label": "cat", "x1": 40, "y1": 60, "x2": 120, "y2": 140}])
    red = PALETTE[0]
    # default width: max(2, round(sqrt(200*160)/250)) = max(2, 1) = 2; drawn on/inside [40,120)x[60,140)
    for x in (40, 41, 118, 119):
        assert px(out, x, 100) == red
    for y in (60, 61, 138, 139):
        assert px(out, 80, y) == red
    a = np.asarray(out)
    assert (a[62:138, 42:118] == 255).all(), "box interior must stay untouched"
    assert px(out, 120, 100) == WHITE and px(out, 39, 100) == WHITE and px(out, 80, 140) == WHITE
    assert (a[:, 150:] == 255).all() and (a[145:] == 255).all()
    # the label tag sits right above the box, filled with the box colour, text in a contrasting colour
    assert px(out, 40, 59) == red
    tag = a[:60, 40:120].reshape(-1, 3)
    assert (tag == red).all(axis=1).sum() > 20 and (tag == 255).all(axis=1).sum() > 5
    assert px(img, 40, 100) == WHITE, "the input image must not be modified"


def test_colours_distinct_per_label_and_stable_within_label():
    img = Image.new("RGB", (300, 100), WHITE)
    boxes = [{"label": "a", "x1": 10, "y1": 40, "x2": 90, "y2": 90},
             {"label": "b", "x1": 110, "y1": 40, "x2": 190, "y2": 90},
             {"label": "a", "x1": 210, "y1": 40, "x2": 290, "y2": 90}]
    out = draw_boxes(img, boxes)
    left, mid, right = px(out, 10, 70), px(out, 110, 70), px(out, 210, 70)
    assert left == right == PALETTE[0] and mid == PALETTE[1] and left != mid


def test_point_quad_and_unlabelled():
    img = Image.new("RGB", (100, 100), WHITE)
    out = draw_boxes(img, [{"label": None, "x1": 50, "y1": 50, "x2": 50, "y2": 50},
                           {"label": None, "x1": 10, "y1": 10, "x2": 30, "y2": 30,
                            "points": [[10, 10], [30, 10], [30, 30], [10, 30]]}])
    assert px(out, 50, 50) != WHITE and px(out, 50, 50) == PALETTE[0]
    assert px(out, 58, 50) == WHITE and px(out, 50, 42) == WHITE  # radius 2*lw = 4 (+ outline)
    assert px(out, 20, 10) == PALETTE[0] and px(out, 20, 20) == WHITE  # quad edge / interior
    assert (np.asarray(out)[:8] == 255).all(), "no label: no tag drawn"


def test_line_width_scales_with_image():
    img = Image.new("RGB", (1250, 1250), WHITE)  # sqrt(1250*1250)/250 = 5
    out = draw_boxes(img, [{"label": None, "x1": 100, "y1": 100, "x2": 600, "y2": 600}])
    assert px(out, 104, 300) == PALETTE[0] and px(out, 105, 300) == WHITE
    thin = draw_boxes(img, [{"label": None, "x1": 100, "y1": 100, "x2": 600, "y2": 600}], line_width=1)
    assert px(thin, 100, 300) == PALETTE[0] and px(thin, 101, 300) == WHITE


def test_large_and_extreme_aspect_images_with_parsed_boxes():
    # 2600x1700 = 4.42 MP; Qwen3-VL grid coordinates -> original pixels: 500/1000*2600 = 1300
    big = Image.new("L", (2600, 1700), 255)
    boxes = parse_boxes('[{"bbox_2d": [500, 500, 1000, 1000], "label": "狗"}]', "qwen3_vl",
                        image_size=big.size)
    out = draw_boxes(big, boxes)
    assert out.mode == "RGB" and out.size == big.size
    lw = round((2600 * 1700) ** 0.5 / 250)  # 8.4 -> 8
    assert px(out, 1300 + lw - 1, 1300) == PALETTE[0] and px(out, 1300 + lw, 1300) == WHITE
    assert px(out, 2599, 1300) == PALETTE[0]  # box clamped to the image: right edge on the last column
    strip = Image.new("RGB", (3000, 30), WHITE)  # aspect 100: tag does not fit above, goes inside
    out = draw_boxes(strip, [{"label": "line", "x1": 0, "y1": 0, "x2": 3000, "y2": 30}])
    assert px(out, 1500, 0) == PALETTE[0] and px(out, 2999, 15) == PALETTE[0]


@pytest.mark.skipif(not any("CJK" in p for p in drawing._font_candidates()), reason="no Noto CJK font installed")
def test_chinese_label_uses_cjk_font():
    assert "CJK" in os.path.basename(find_font())
    font = drawing._load_font(24)
    assert font.getname()[0].startswith("Noto") and "CJK" in font.getname()[0]
    img = Image.new("RGB", (200, 200), WHITE)
    out = draw_boxes(img, [{"label": "猫咪", "x1": 20, "y1": 100, "x2": 180, "y2": 190}])
    tag = np.asarray(out)[:100, 20:180].reshape(-1, 3)
    # Real glyphs: many text-coloured pixels inside the tag (a missing-glyph box would draw few).
    assert (tag == 255).all(axis=1).sum() > 40


def test_no_font_found_falls_back_without_crashing(monkeypatch):
    monkeypatch.setattr(drawing, "_font_candidates", lambda: [])
    assert find_font() is None
    img = Image.new("RGB", (120, 120), WHITE)
    box = {"label": "猫", "x1": 20, "y1": 50, "x2": 100, "y2": 110}
    out = draw_boxes(img, [box])  # PIL's default font: no CJK glyphs, but no crash
    assert px(out, 20, 80) == PALETTE[0] and px(out, 60, 80) == WHITE

    def broken(*a, **k):
        raise OSError("no fonts at all")
    monkeypatch.setattr(ImageFont, "load_default", broken)
    out = draw_boxes(img, [box])  # no font whatsoever: boxes only
    assert px(out, 20, 80) == PALETTE[0]
    assert (np.asarray(out)[:50] == 255).all(), "no tag without a font"


def test_bitmap_default_font_with_chinese_label(monkeypatch):
    if not hasattr(ImageFont, "load_default_imagefont"):
        pytest.skip("PIL without the bitmap default font accessor")
    monkeypatch.setattr(drawing, "_font_candidates", lambda: [])
    monkeypatch.setattr(ImageFont, "load_default", lambda *a, **k: ImageFont.load_default_imagefont())
    img = Image.new("RGB", (120, 120), WHITE)
    out = draw_boxes(img, [{"label": "猫", "x1": 20, "y1": 50, "x2": 100, "y2": 110},
                           {"label": "cat", "x1": 30, "y1": 60, "x2": 90, "y2": 100}])
    assert px(out, 20, 80) == PALETTE[0] and px(out, 30, 80) == PALETTE[1]


def test_bad_entries_skipped_and_empty_list():
    img = Image.new("RGB", (50, 50), WHITE)
    assert np.array_equal(np.asarray(draw_boxes(img, [])), np.asarray(img))
    out = draw_boxes(img, [{"label": "x"}, {"x1": "a", "y1": 0, "x2": 1, "y2": 1},
                           {"label": "ok", "x1": 30, "y1": 40, "x2": 10, "y2": 20}])  # swapped corners
    assert px(out, 10, 30) == PALETTE[0]
