"""Where a model's grounding answers go wrong: per-edge errors of its boxes on held-out items, split into
the horizontal and the vertical, in 0..1000-grid units and in image tokens (what the model's positions count).

    python scripts/grounding_errors.py [--model DIR] [--n 200] [--lang en]

Accuracy at IoU >= 0.5 says how often a box is right; this says why it is not: a model that cannot tell
columns apart misses x1/x2 much more than y1/y2, one that finds the wrong shape misses both by a lot, one
that finds the shape but not its edges misses by a fraction of the shape's size. The last lines split the
boxes by the shape whose centre lies nearest the box's centre: the asked one (the box's IoU then measures
its precision) or another, and if another, whether it shares the asked one's kind or its colour.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwenvl import LLM, SamplingParams  # noqa: E402
from qwenvl.inputs import PreprocessorConfig  # noqa: E402
from qwenvl.inputs.preprocess import smart_resize  # noqa: E402
from qwenvl.synthetic import messages, to_grid  # noqa: E402
from qwenvl.evaluation.task_eval import grid_to_pixels, heldout_set, iou, parse_grid_boxes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: the bundled model)")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--lang", default="en")
    args = ap.parse_args()
    llm = LLM(args.model)
    pre = PreprocessorConfig.from_dir(llm.engine.model_dir)
    side = pre.patch_size * pre.merge_size   # pixels per side of one image token (2x2 merged patches)
    samples = heldout_set("ground", args.lang, args.n)
    outs = llm.generate([messages(s)[:1] for s in samples], SamplingParams(temperature=0.0, max_tokens=48))
    dx, dy, dx_tok, dy_tok, ious, unparsed = [], [], [], [], [], 0
    picked_iou, other_kind, other_color, others = [], 0, 0, 0
    for s, o in zip(samples, outs, strict=True):
        boxes = parse_grid_boxes(o.text)
        if not boxes:
            unparsed += 1
            continue
        W, H = s.image.size
        gold = to_grid(s.boxes[0], (W, H))
        pred = boxes[0]
        pred_px = grid_to_pixels(pred, (W, H))
        ious.append(iou(pred_px, s.boxes[0]))
        target, picked = s.meta["target"], nearest_shape(pred_px, s.meta["shapes"])
        if picked is target:
            picked_iou.append(ious[-1])
        else:
            others += 1
            other_kind += picked.kind == target.kind
            other_color += picked.color == target.color
        h, w = smart_resize(H, W, factor=side, min_pixels=pre.min_pixels, max_pixels=pre.max_pixels)
        cols, rows = w / side, h / side
        for i in (0, 2):
            dx.append(abs(pred[i] - gold[i]))
            dx_tok.append(abs(pred[i] - gold[i]) / 1000 * cols)
        for i in (1, 3):
            dy.append(abs(pred[i] - gold[i]))
            dy_tok.append(abs(pred[i] - gold[i]) / 1000 * rows)
    med = statistics.median
    print(f"{len(samples)} items, {unparsed} without a box; IoU >= 0.5: "
          f"{sum(v >= 0.5 for v in ious) / len(samples):.1%}, median IoU {med(ious) if ious else 0:.2f}")
    if dx:
        print(f"x edges: median error {med(dx):.0f} grid units, {med(dx_tok):.2f} tokens")
        print(f"y edges: median error {med(dy):.0f} grid units, {med(dy_tok):.2f} tokens")
    if picked_iou:
        print(f"nearest the asked shape: {len(picked_iou)} boxes, IoU >= 0.5 for "
              f"{sum(v >= 0.5 for v in picked_iou) / len(picked_iou):.1%}, median IoU {med(picked_iou):.2f}")
    print(f"nearest another shape: {others} boxes, {other_kind} of them of the asked kind, "
          f"{other_color} of the asked colour")


def nearest_shape(box, shapes):
    """The shape whose box centre lies nearest `box`'s centre (pixels)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return min(shapes, key=lambda s: ((s.box[0] + s.box[2]) / 2 - cx) ** 2 + ((s.box[1] + s.box[3]) / 2 - cy) ** 2)


if __name__ == "__main__":
    main()
