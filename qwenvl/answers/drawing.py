"""Draw grounding boxes (as returned by `qwenvl.grounding.parse_boxes`) on an image.

Boxes are outlined on and inside their bounds (the outline never spills outside the box), points are
filled dots, quadrilaterals (boxes with "points") are drawn as polygons. Each label gets its own
colour, in order of first appearance. Labels are written on a filled tag of the box's colour, with a
CJK-capable font when one is installed (Noto CJK), else DejaVu, else PIL's built-in font; when no
font can render a label, the box is drawn without its text. Drawing never raises for a font problem.
"""

from __future__ import annotations

import glob
import os
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

__all__ = ["draw_boxes", "find_font", "PALETTE"]

# Distinct, saturated colours (Tableau-like); cycled when there are more labels than colours.
PALETTE = [
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40),
    (128, 0, 0), (0, 0, 128), (128, 128, 0), (255, 225, 25), (250, 190, 212),
    (170, 255, 195), (220, 190, 255), (128, 128, 128),
]

FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", os.path.expanduser("~/.fonts"),
             "/System/Library/Fonts", "/Library/Fonts", "C:/Windows/Fonts")
# Most preferred first: CJK-capable fonts, then DejaVu (Latin, no CJK glyphs).
_FONT_PATTERNS = ("NotoSansCJK*-Regular.tt[cf]", "NotoSansCJK*.tt[cf]", "NotoSans*CJK*.[ot]t[cf]",
                  "NotoSerifCJK*.tt[cf]", "NotoSerif*CJK*.[ot]t[cf]", "wqy-*.tt[cf]", "DejaVuSans.ttf",
                  "DejaVuSans*.ttf")


def _font_candidates() -> list[str]:
    """Font files on this machine, most preferred first (tests monkeypatch this to find none)."""
    found: list[str] = []
    for pattern in _FONT_PATTERNS:
        for d in FONT_DIRS:
            if os.path.isdir(d):
                for p in sorted(glob.glob(os.path.join(d, "**", pattern), recursive=True)):
                    if p not in found:
                        found.append(p)
    return found


def find_font() -> str | None:
    """Path of the preferred font file (a Noto CJK font when installed), or None."""
    c = _font_candidates()
    return c[0] if c else None


@lru_cache(maxsize=32)
def _truetype(path: str, size: int):
    # A .ttc holds several faces; the Simplified-Chinese one draws Chinese labels best.
    if path.lower().endswith(".ttc"):
        for index in range(10):
            try:
                f = ImageFont.truetype(path, size, index=index)
            except OSError:
                break
            if f.getname()[0].endswith(" SC"):
                return f
    return ImageFont.truetype(path, size)


def _load_font(size: int):
    """The best loadable font at `size`, or None when not even PIL's default loads."""
    for path in _font_candidates():
        try:
            return _truetype(path, size)
        except (OSError, ValueError):
            continue
    try:
        return ImageFont.load_default(size)
    except Exception:  # older PIL without sized defaults, or no FreeType
        try:
            return ImageFont.load_default()
        except Exception:
            return None


def _text_colour(rgb) -> tuple[int, int, int]:
    r, g, b = rgb
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def draw_boxes(image: Image.Image, boxes, line_width: int | None = None) -> Image.Image:
    """A copy of `image` (RGB) with `boxes` drawn.

    boxes: [{"label": str | None, "x1", "y1", "x2", "y2"[, "points"]}] in pixels of `image`.
    line_width: default scales with the image, max(2, round(sqrt(W * H) / 250)).
    """
    img = image.convert("RGB") if image.mode != "RGB" else image.copy()
    W, H = img.size
    lw = line_width or max(2, round((W * H) ** 0.5 / 250))
    font = _load_font(max(12, min(64, round((W * H) ** 0.5 / 40)))) if boxes else None
    draw = ImageDraw.Draw(img)
    colours: dict = {}
    tags = []  # drawn after every outline so that no box covers a label
    for b in boxes:
        try:
            x1, y1, x2, y2 = (float(b[k]) for k in ("x1", "y1", "x2", "y2"))
        except (KeyError, TypeError, ValueError):
            continue
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        label = b.get("label")
        colour = colours.setdefault(label, PALETTE[len(colours) % len(PALETTE)])
        X1, Y1, X2, Y2 = (int(round(v)) for v in (x1, y1, x2, y2))
        if X1 == X2 and Y1 == Y2:  # a point
            r = 2 * lw
            draw.ellipse([X1 - r, Y1 - r, X1 + r, Y1 + r], fill=colour, outline=(255, 255, 255))
        elif b.get("points"):
            pts = [(int(round(x)), int(round(y))) for x, y in b["points"]]
            draw.line(pts + pts[:1], fill=colour, width=lw, joint="curve")
        else:
            # PIL draws [x0, x1] inclusive; keep the outline within the box's own pixels.
            draw.rectangle([X1, Y1, max(X1, X2 - 1), max(Y1, Y2 - 1)], outline=colour, width=lw)
        if label not in (None, "") and font is not None:
            tags.append((str(label), colour, X1, Y1))
    for text, colour, X1, Y1 in tags:
        _draw_tag(draw, font, text, colour, X1, Y1, W, H)
    return img


def _draw_tag(draw, font, text: str, colour, x: int, y: int, W: int, H: int) -> None:
    """A filled label tag just above (x, y), or just inside the box when there is no room."""
    try:
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
    except Exception:  # e.g. the bitmap default font cannot encode CJK text
        return
    pad = max(1, (b - t) // 6)
    tw, th = r - l + 2 * pad, b - t + 2 * pad
    tx = min(max(x, 0), max(0, W - tw))
    ty = y - th if y - th >= 0 else min(max(y, 0), max(0, H - th))
    try:
        draw.rectangle([tx, ty, tx + tw - 1, ty + th - 1], fill=colour)
        draw.text((tx + pad - l, ty + pad - t), text, font=font, fill=_text_colour(colour))
    except Exception:  # a font that cannot render the text: keep the box, drop the text
        return
