"""Visual grounding: parse every Qwen-VL family's box output, convert it to original-image pixels,
and build each family's own grounding prompt. Drawing lives in `qwenvl.drawing`.

What each family emits (the model's own frame of reference):

  qwen_vl     <ref>label</ref><box>(x1,y1),(x2,y2)</box>            0..1000 grid
              <quad>(x1,y1),(x2,y2),(x3,y3),(x4,y4)</quad>
  qwen2_vl    <|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>
              <|quad_start|>(x1,y1),...,(x4,y4)<|quad_end|>         0..1000 grid
  qwen2_5_vl  JSON [{"bbox_2d": [x1,y1,x2,y2], "label": ...}, {"point_2d": [x,y], ...}]
              absolute pixels of the RESIZED input (the smart-resized size the model saw)
  qwen3_vl    the same JSON, on a 0..1000 grid

Both tag spellings are accepted for both tag families (the coordinates mean the same thing). A JSON
family whose reply has no JSON boxes falls back to the tag syntax in its own coordinate frame, and a
tag family to JSON, so a model prompted in the "other" style still yields its boxes. A tag family's
reply decoded with its special tokens skipped ("the man(123,235),(324,546)") still gives its boxes,
without labels, from the bare "(x1,y1),(x2,y2)" pairs.

The 0..1000 grid maps straight onto the ORIGINAL image (x / 1000 * W): it is resolution
independent. Qwen2.5-VL's absolute coordinates map through the resize: x * W / input_w.

Parsing never raises on model text: truncated or malformed output yields the boxes that are
complete. A box is complete when all its coordinates are closed ("(x,y)" with its ")", a JSON
object with its "}"); a missing closing tag alone does not drop a box.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["FAMILIES", "parse_boxes", "parse_boxes_multi", "convert_box", "grounding_prompt", "declared_grounding_prompt"]

FAMILIES = ("qwen_vl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
_TAG_FAMILIES = ("qwen_vl", "qwen2_vl")
_ALIASES = {"qwen2.5_vl": "qwen2_5_vl", "qwen25_vl": "qwen2_5_vl", "qwen3_vl_moe": "qwen3_vl",
            "qwen_vl_chat": "qwen_vl"}


def _family(family: str) -> str:
    f = str(family).strip().lower().replace("-", "_")
    f = _ALIASES.get(f, f).replace(".", "_")
    if f not in FAMILIES:
        raise ValueError(f"unknown grounding family {family!r}; expected one of {', '.join(FAMILIES)}")
    return f


# --------------------------------------------------------------------------------------------
# Raw parsing: boxes in the model's own frame, with the character offset where each appears.
# A raw box is {"label", "coords": [x1, y1, x2, y2], "points": [[x, y]*4] | None,
#               "pos": int, "image_index": int | None (explicit hint), "group": int | None}.
# --------------------------------------------------------------------------------------------

_NUM = r"-?\d+(?:\.\d+)?"
_PAIR = re.compile(rf"\(\s*({_NUM})\s*,\s*({_NUM})\s*\)")
_BRACKETED = re.compile(rf"\[\s*({_NUM}(?:\s*,\s*{_NUM})*)\s*\]")
_TAG = re.compile(
    r"<ref>(?P<ref>.*?)(?:</ref>|(?=<)|$)"
    r"|<\|object_ref_start\|>(?P<ref2>.*?)(?:<\|object_ref_end\|>|(?=<)|$)"
    r"|<(?P<kind>box|quad)>(?P<body>.*?)(?:</(?P=kind)>|(?=<)|$)"
    r"|<\|(?P<kind2>box|quad)_start\|>(?P<body2>.*?)(?:<\|(?P=kind2)_end\|>|(?=<)|$)",
    re.S,
)
# Text allowed between a label and its boxes (and between consecutive boxes of one label).
_JOINER = re.compile(r"^(?:[\s,;:，；、。.]|和|及|与|and\b)*$", re.I)


def _tag_boxes(text: str) -> list[dict]:
    """Qwen-VL / Qwen2-VL tag syntax. A label applies to the boxes that follow it directly (only
    whitespace or separators between them); a box with no such label gets label None."""
    out: list[dict] = []
    label, last_end = None, 0
    for m in _TAG.finditer(text):
        ref = m.group("ref") if m.group("ref") is not None else m.group("ref2")
        if ref is not None:
            label, last_end = (ref.strip() or None), m.end()
            continue
        if label is not None and not _JOINER.match(text[last_end:m.start()]):
            label = None
        last_end = m.end()
        kind = m.group("kind") or m.group("kind2")
        body = m.group("body") if m.group("body") is not None else m.group("body2")
        n = 4 if kind == "quad" else 2
        pts = [[float(x), float(y)] for x, y in _PAIR.findall(body)]
        if not pts:  # tolerate "[x1, y1, x2, y2]" written inside the tag
            for grp in _BRACKETED.findall(body):
                nums = [float(v) for v in grp.split(",")]
                pts += [nums[i:i + 2] for i in range(0, len(nums) - 1, 2)]
        for i in range(0, len(pts) - n + 1, n):  # several boxes in one tag; drop a partial tail
            corners = pts[i:i + n]
            xs, ys = [p[0] for p in corners], [p[1] for p in corners]
            out.append({"label": label, "coords": [min(xs), min(ys), max(xs), max(ys)],
                        "points": corners if kind == "quad" else None, "pos": m.start(),
                        "image_index": None, "group": None})
    return out


_BOX_KEYS = ("bbox_2d", "bbox", "box_2d", "box")
_POINT_KEYS = ("point_2d", "point")
_LABEL_KEYS = ("label", "text_content", "text", "name", "category", "description")


def _numbers(v) -> list[float] | None:
    if isinstance(v, str):  # '"bbox_2d": "[1, 2, 3, 4]"'
        v = [s for s in re.findall(_NUM, v)]
    if not isinstance(v, (list, tuple)):
        return None
    try:
        nums = [float(x) for x in v]
    except (TypeError, ValueError):
        return None
    return nums if all(x == x and abs(x) != float("inf") for x in nums) else None


def _shapes(v, n: int, depth: int = 0) -> list[list[float]]:
    """A coordinate value: flat [n numbers], or nested [[n], [n], ...] (several shapes)."""
    flat = _numbers(v)
    if flat is not None:
        return [flat[:n]] if len(flat) >= n else []
    if isinstance(v, (list, tuple)) and depth < 4:
        return [s for item in v for s in _shapes(item, n, depth + 1)]
    return []


def _label_of(d: dict) -> str | None:
    for k in _LABEL_KEYS:
        v = d.get(k)
        if isinstance(v, (str, int, float)) and not isinstance(v, bool) and str(v).strip():
            return str(v).strip()
    return None


def _walk(value, pos: int, group: int | None, out: list[dict], depth: int = 0) -> None:
    if depth > 32:  # real replies nest two or three levels; never recurse without bound
        return
    if isinstance(value, list):
        for item in value:
            _walk(item, pos, group, out, depth + 1)
        return
    if not isinstance(value, dict):
        return
    label = _label_of(value)
    hint = value.get("image_index")
    hint = hint if isinstance(hint, int) and not isinstance(hint, bool) else None
    found = False
    for key in _BOX_KEYS:
        for x1, y1, x2, y2 in _shapes(value.get(key), 4):
            out.append({"label": label, "coords": [x1, y1, x2, y2], "points": None, "pos": pos,
                        "image_index": hint, "group": group})
            found = True
        if found:
            break
    if not found:
        for key in _POINT_KEYS:
            for x, y in _shapes(value.get(key), 2):
                out.append({"label": label, "coords": [x, y, x, y], "points": None, "pos": pos,
                            "image_index": hint, "group": group})
                found = True
            if found:
                break
    if not found:  # a wrapper such as {"objects": [...]}
        for v in value.values():
            if isinstance(v, (list, dict)):
                _walk(v, pos, group, out, depth + 1)


_DECODER = json.JSONDecoder()
_OPEN = re.compile(r"[\[{]")
_XML_POINTS = re.compile(r"<points\b([^>]*)>(.*?)(?:</points>|$)", re.S)
_ATTR = re.compile(r'(\w+)\s*=\s*"([^"]*)"')


def _json_boxes(text: str) -> list[dict]:
    """Every decodable JSON value, scanned left to right. A truncated outer list fails to decode
    as a whole, and the scan then picks up the complete objects inside it one by one."""
    out: list[dict] = []
    i = 0
    while True:
        m = _OPEN.search(text, i)
        if m is None:
            break
        try:
            value, end = _DECODER.raw_decode(text, m.start())
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            i = m.start() + 1
            continue
        if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            # [[boxes of image 1], [boxes of image 2], ...]: remember which sub-list a box came from
            for g, sub in enumerate(value):
                _walk(sub, m.start(), g, out)
        else:
            _walk(value, m.start(), None, out)
        i = end
    # Qwen2.5-VL's XML point form: <points x1="10" y1="20" x2=".." y2=".." alt="label">label</points>
    for m in _XML_POINTS.finditer(text):
        attrs = dict(_ATTR.findall(m.group(1)))
        label = (attrs.get("alt") or m.group(2) or "").strip() or None
        k = 1
        while f"x{k}" in attrs and f"y{k}" in attrs:
            try:
                x, y = float(attrs[f"x{k}"]), float(attrs[f"y{k}"])
            except ValueError:
                break
            out.append({"label": label, "coords": [x, y, x, y], "points": None, "pos": m.start(),
                        "image_index": None, "group": None})
            k += 1
    out.sort(key=lambda b: b["pos"])
    return out


# "(x1,y1),(x2,y2)" left behind when a tag family's reply was decoded with its special tokens skipped.
_BARE_BOX = re.compile(r"\(\s*(\d{1,4})\s*,\s*(\d{1,4})\s*\)\s*,\s*\(\s*(\d{1,4})\s*,\s*(\d{1,4})\s*\)")


def _bare_boxes(text: str) -> list[dict]:
    return [{"label": None, "coords": [float(v) for v in m.groups()], "points": None, "pos": m.start(),
             "image_index": None, "group": None} for m in _BARE_BOX.finditer(text)]


def _raw_boxes(text: str, family: str) -> list[dict]:
    if not isinstance(text, str) or not text:
        return []
    if family in _TAG_FAMILIES:
        boxes = _tag_boxes(text) or _json_boxes(text)
        # bare pairs only when no grounding tag is present at all (an incomplete tag yields nothing)
        return boxes or ([] if _TAG.search(text) else _bare_boxes(text))
    return _json_boxes(text) or _tag_boxes(text)


# --------------------------------------------------------------------------------------------
# Conversion to original-image pixels
# --------------------------------------------------------------------------------------------

def _size(size, name: str) -> tuple[float, float]:
    try:
        w, h = size
        w, h = float(w), float(h)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (width, height) pair, got {size!r}") from None
    if not (w > 0 and h > 0):
        raise ValueError(f"{name} must be positive, got {size!r}")
    return w, h


def _scale(family: str, input_size, image_size) -> tuple[float, float] | None:
    """Factors from the model's frame to original pixels; None when image_size is unknown."""
    if image_size is None:
        return None
    W, H = _size(image_size, "image_size")
    if family == "qwen2_5_vl":
        # Absolute pixels of the resized input. Without input_size we assume the model saw the
        # image unresized (input == original).
        iw, ih = _size(input_size, "input_size") if input_size is not None else (W, H)
        return W / iw, H / ih
    return W / 1000.0, H / 1000.0


def convert_box(raw: dict, family: str, input_size=None, image_size=None) -> dict:
    """One raw box ({"label", "coords": [x1, y1, x2, y2], "points"?}) in the model's frame ->
    {"label", "x1", "y1", "x2", "y2"[, "points"]} in original-image pixels: corners ordered
    (x1 <= x2, y1 <= y2) and clamped to [0, W] x [0, H]. Without image_size the coordinates stay
    in the model's frame (only the corner order is fixed)."""
    family = _family(family)
    s = _scale(family, input_size, image_size)
    x1, y1, x2, y2 = (float(v) for v in raw["coords"])
    x1, x2 = min(x1, x2), max(x1, x2)
    y1, y2 = min(y1, y2), max(y1, y2)

    def px(x: float, y: float) -> list[float]:
        # Rounded to 0.1 px: finer is below any image's resolution, and 99.82000000000001 helps no one.
        if s is None:
            return [round(x, 1), round(y, 1)]
        W, H = _size(image_size, "image_size")
        return [round(min(max(x * s[0], 0.0), W), 1), round(min(max(y * s[1], 0.0), H), 1)]

    (a, b), (c, d) = px(x1, y1), px(x2, y2)
    box = {"label": raw.get("label"), "x1": a, "y1": b, "x2": c, "y2": d}
    if raw.get("points"):
        box["points"] = [px(float(x), float(y)) for x, y in raw["points"]]
    return box


def parse_boxes(text: str, family: str = "qwen2_5_vl", input_size=None, image_size=None) -> list[dict]:
    """Boxes in a model reply, in original-image pixels.

    text:       the generated text (grounding markers or JSON, possibly truncated).
    family:     "qwen_vl" | "qwen2_vl" | "qwen2_5_vl" | "qwen3_vl" (HF model_type spellings accepted).
    input_size: (w, h) the smart-resized size the model saw; used by qwen2_5_vl only.
    image_size: (w, h) of the original image; None leaves coordinates in the model's frame.

    Returns [{"label": str | None, "x1", "y1", "x2", "y2"}] (floats), in the order they appear; a
    point has x1 == x2 and y1 == y2; a quadrilateral comes back as its bounding box with its four
    corners (converted) under "points".
    """
    family = _family(family)
    return [convert_box(r, family, input_size, image_size) for r in _raw_boxes(text, family)]


# --------------------------------------------------------------------------------------------
# Multi-image prompts
# --------------------------------------------------------------------------------------------

# "Picture 2", "image 2", "Image #2", "图2", "图片 2", "第2张" -- 1-based, as the chat templates
# label images ("Picture 1: <img>...").
_MENTION = re.compile(r"(?:\b(?:picture|image|img)\s*#?\s*|图片?\s*)(\d+)|第\s*(\d+)\s*[张幅]", re.I)


def parse_boxes_multi(text: str, family: str, input_sizes, image_sizes, default_index: int = -1) -> list[dict]:
    """Boxes of a reply to a prompt with several images, each converted with its own image's sizes
    and tagged with "image_index" (0-based position of the image in the prompt).

    input_sizes / image_sizes: one (w, h) per image, in prompt order (input_sizes may be None for
    grid families). A box is assigned to an image by the first rule that applies:
      1. an explicit "image_index" key (0-based) in the box's JSON object;
      2. JSON nested per image -- a top-level list of lists: the k-th sub-list is image k;
      3. the last image mention before the box in the text ("Picture 2", "Image 2", "图2",
         "第2张"; 1-based as in the chat templates' "Picture 1:" labels);
      4. default_index (default -1: the last image, the one a reply is usually about).
    Indices outside the prompt's images are ignored (the next rule applies).
    """
    family = _family(family)
    n = len(image_sizes)
    if n == 0:
        return []
    if input_sizes is None:
        input_sizes = [None] * n
    if len(input_sizes) != n:
        raise ValueError(f"got {len(input_sizes)} input_sizes for {n} image_sizes; pass one per image")
    default = default_index % n if -n <= default_index < n else n - 1
    mentions = [(m.start(), int(m.group(1) or m.group(2)) - 1) for m in _MENTION.finditer(text or "")]
    out = []
    for raw in _raw_boxes(text, family):
        idx = None
        for cand in (raw["image_index"], raw["group"]):
            if idx is None and cand is not None and 0 <= cand < n:
                idx = cand
        if idx is None:
            before = [k for p, k in mentions if p < raw["pos"] and 0 <= k < n]
            idx = before[-1] if before else default
        box = convert_box(raw, family, input_sizes[idx], image_sizes[idx])
        box["image_index"] = idx
        out.append(box)
    return out


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")


def grounding_prompt(family: str, description: str, points: bool = False) -> str:
    """The grounding request each family was trained to answer, for `description`.

    qwen_vl:    '输出"X"的检测框' for Chinese, 'Generate the bounding box of X' otherwise -- the
                phrasings of Qwen-VL-Chat's README and web demo; the reply is <ref>X</ref><box>..</box>.
    qwen2_vl:   'Find <|object_ref_start|>X<|object_ref_end|>' -- Qwen2-VL's referring-grounding
                format (the object wrapped in its ref tokens); the reply is <|box_start|>(..),(..)<|box_end|>
                on the 0..1000 grid.
    qwen2_5_vl: 'Locate every "X" in the image, output the bbox coordinates in JSON format.' -- the
                wording of the Qwen2.5-VL spatial-understanding cookbook; the reply is ```json
                [{"bbox_2d": [...], "label": ...}]``` in resized-input pixels.
    qwen3_vl:   'Locate every instance that belongs to the following categories: "X". Report bbox
                coordinates in JSON format.' -- the Qwen3-VL 2D-grounding cookbook wording; same
                JSON, on the 0..1000 grid.
    points=True asks the JSON families for point_2d instead of bbox_2d (tag families have no points).
    """
    family = _family(family)
    d = str(description).strip()
    if family == "qwen_vl":
        return f'输出"{d}"的检测框' if _CJK.search(d) else f"Generate the bounding box of {d}"
    if family == "qwen2_vl":
        return f"Find <|object_ref_start|>{d}<|object_ref_end|>"
    if family == "qwen2_5_vl":
        what = "point" if points else "bbox"
        return f'Locate every "{d}" in the image, output the {what} coordinates in JSON format.'
    if points:
        return (f'Locate every instance that belongs to the following categories: "{d}". '
                "Report point coordinates in JSON format.")
    return (f'Locate every instance that belongs to the following categories: "{d}". '
            "Report bbox coordinates in JSON format.")


def declared_grounding_prompt(model_dir: str | Path, description: str) -> str | None:
    """The grounding request a checkpoint declares for itself, or None when it declares none.

    A model trained on its own phrasing (the bundled model learnt "Locate the red triangle." and
    "找到红色的三角形。", not Qwen2-VL's "Find <|object_ref_start|>..") names it in generation_config.json:
    "grounding_prompt" (and "grounding_prompt_zh", used for a description with Chinese characters), with
    `{description}` where the object goes.
    """
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return None
    gen = json.loads(path.read_text(encoding="utf-8"))
    d = str(description).strip()
    template = (_CJK.search(d) and gen.get("grounding_prompt_zh")) or gen.get("grounding_prompt")
    return template.format(description=d) if template else None
