"""Dense labels for the vision tower: which shape (colour, kind, edges, same-kind count) each image token shows.

A from-scratch vision-language model learns to look slowly: at first the language model attends to the
image tokens almost uniformly, so the answer sees their mean, where one shape is a few tokens among a
hundred of background, and the gradient reaching the vision tower is diluted the same way. Measured with
scripts/vision_pooling_probe.py: a new vision tower under a max-pool head learns a lone shape's colour in
about 40 steps of 32 images; under a mean-pool head it is still at chance after 60. A per-token label (the
colour and kind of the shape a token shows, or background) gives every token its own gradient from the
first step, so the tower learns features the language model can pick out. The labels come free from the
scene the generator drew.

Each shape token also learns where its shape's edges are, as distances from the token's own centre in
tokens (left, top, right, bottom): "I am the top-left corner of a 3 x 2 token triangle". Not the box on the
image's 0..1000 grid: the vision tower's only positions are rotary, so relative, and its values carry no
position at all; on a uniform background every background token computes the same thing wherever it
is, so no head can read absolute position off a token (an earlier version asked for the grid box and its
digits: the tens digit stayed at chance, 9.9%). Where a token is comes to the language model from its
M-RoPE position; what the tower can add is which tokens are a shape's corners and how far the edges are.

Each shape token also learns how many shapes of its own kind the scene holds: a counting question then
becomes what the colour question already is, "find a token of that kind, read its label out", instead of
an aggregation over the image that a few-layer language model's softmax attention does poorly.

The language model is where a token's place can be known: its M-RoPE position says which row and column it
is in. So a second set of heads reads the language model's hidden state of every image token after layer
LM_PROBE_LAYER and learns where on the image that token is, and, on a shape token, its shape's box, both as
fractions of the image's width and height (what the 0..1000-grid answer writes). Nothing else asks those
first layers to turn rotary phases into positions before the answer needs them.

On a reading scene (one word or number) every image token on the text's rows learns which character is under
each of four evenly spaced points across it (7 px apart at the model's 28-px tokens; a character narrower than
that, an i or an apostrophe at the smallest sizes, takes the point nearest its centre), or background
between and beside the characters: the reading counterpart of the shape labels, so the tower learns letters
from the first step instead of only through the answer's few tokens.

`VisionProbe` holds the linear heads; they live only in training (saved in train_state.pt for resume,
never in the exported checkpoint).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from ..synthetic import Sample
from ..synthetic.scenes import SHAPES, Shape, draw_shape
from ..synthetic.style import COLORS

IGNORE = -1                 # a token with no label (an image that is not a shape scene)
BACKGROUND = 0              # classes: 0 background, then 1 + index in COLORS / SHAPES
MIN_PIXELS_PER_TOKEN = 20   # a token shows a shape when at least this many of its pixels are the shape's ink
BACKGROUND_WEIGHT = 0.2     # background tokens are most of an image; they count less in the loss
EDGE_WEIGHT = 1.0           # the edge head's L1 error is in tokens (a few), the classes' cross-entropy ~1
EDGE_SCALE = 10             # edge distances are stored in tenths of a token (integer labels)
CHAR_POINTS = 4             # points across a token whose character is labelled (reading scenes)
SHAPE_COLUMNS = 7
LABEL_COLUMNS = SHAPE_COLUMNS + CHAR_POINTS   # colour class, kind class, distances to the left, top, right and
                            # bottom edge (tenths of a token), same-kind count (edges and count IGNORE off
                            # shapes); then the character under each of CHAR_POINTS points (reading scenes)
CHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'"
OTHER_CHAR = 1 + len(CHARS)  # character classes: 0 background, 1 + index in CHARS, then any other character
MAX_SAME_KIND = 8           # count classes 0..8 (a scene holds at most 8 shapes)
LM_PROBE_LAYER = 1          # the position heads read the output of this decoder layer (0-based)
POSITION_SCALE = 10         # positions are learnt in tenths of the image's width or height


def token_labels(shapes: list[Shape], image_size: tuple[int, int], grid_hw: tuple[int, int],
                 patch_size: int, merge_size: int) -> torch.Tensor:
    """LongTensor[M, LABEL_COLUMNS] (colour class, kind class, distances from the token's centre to its shape's
    left, top, right and bottom edge in tenths of a token, number of shapes of its kind in the scene; the
    character columns IGNORE) per merged token, in the merger's raster order; a background token's edges and
    count are IGNORE. A distance is negative
    when the token's centre lies outside its shape's box (a token counts as showing a shape from a corner).

    `image_size` is the original (W, H); `grid_hw` the patch grid of the resized image the model sees. The
    shapes are drawn again as they were (filled or outlined, same geometry) with their index as ink, so an
    outlined circle's inside is background, as it looks.
    """
    ids = Image.new("RGB", image_size, (0, 0, 0))
    draw = ImageDraw.Draw(ids)
    for i, s in enumerate(shapes, 1):
        ink = (i, i, i)
        draw_shape(draw, dataclasses.replace(s, rgb=ink, outline_rgb=ink if s.outline_rgb else None))
    gh, gw = grid_hw
    side = patch_size * merge_size
    resized = np.asarray(ids.resize((gw * patch_size, gh * patch_size), Image.Resampling.NEAREST))[:, :, 0]
    blocks = resized.reshape(gh // merge_size, side, gw // merge_size, side).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(-1, side * side)                                      # [M, side²] shape ids
    counts = np.stack([(blocks == i).sum(1) for i in range(1, len(shapes) + 1)], 1) if shapes \
        else np.zeros((len(blocks), 0), dtype=np.int64)                          # [M, n_shapes]
    colour = torch.zeros(len(blocks), dtype=torch.long)
    kind = torch.zeros(len(blocks), dtype=torch.long)
    edge = torch.full((len(blocks), 4), IGNORE, dtype=torch.long)
    same_kind = torch.full((len(blocks), 1), IGNORE, dtype=torch.long)
    if shapes:
        best = counts.argmax(1)
        shown = counts.max(1) >= MIN_PIXELS_PER_TOKEN
        colour_of = np.array([1 + COLORS.index(s.color) for s in shapes])
        kind_of = np.array([1 + SHAPES.index(s.kind) for s in shapes])
        colour = torch.from_numpy(np.where(shown, colour_of[best], BACKGROUND))
        kind = torch.from_numpy(np.where(shown, kind_of[best], BACKGROUND))
        edges = _edge_distances(np.array([s.box for s in shapes], dtype=np.float64)[best], image_size,
                                (gh // merge_size, gw // merge_size))
        edge = torch.from_numpy(np.where(shown[:, None], edges, IGNORE))
        count_of = np.array([sum(o.kind == s.kind for o in shapes) for s in shapes])
        same_kind = torch.from_numpy(np.where(shown, count_of[best], IGNORE))[:, None]
    no_text = torch.full((len(blocks), CHAR_POINTS), IGNORE, dtype=torch.long)
    return torch.cat([torch.stack([colour, kind], 1), edge, same_kind, no_text], 1)


def _edge_distances(boxes: np.ndarray, image_size: tuple[int, int], tokens_hw: tuple[int, int]) -> np.ndarray:
    """boxes[M, 4] (pixels of the original image, one per token in raster order) -> int64[M, 4] distances
    from each token's centre to the box's left, top, right, bottom edge, in tenths of a token."""
    W, H = image_size
    rows, cols = tokens_hw
    scale = np.array([cols / W, rows / H, cols / W, rows / H])
    in_tokens = boxes * scale                                                    # box in token units
    cy, cx = np.divmod(np.arange(rows * cols), cols)
    cx, cy = cx + 0.5, cy + 0.5
    dist = np.stack([cx - in_tokens[:, 0], cy - in_tokens[:, 1], in_tokens[:, 2] - cx, in_tokens[:, 3] - cy], 1)
    return np.rint(dist * EDGE_SCALE).astype(np.int64)


def unlabelled(num_tokens: int) -> torch.Tensor:
    return torch.full((num_tokens, LABEL_COLUMNS), IGNORE, dtype=torch.long)


def sample_labels(sample: Sample, grid_thw: torch.Tensor, pre_cfg) -> torch.Tensor:
    """The labels of a synthetic sample's image tokens, seen as `grid_thw` ([1, 3]) patches; unlabelled
    when the sample is neither a shape nor a reading scene. `pre_cfg`: the checkpoint's PreprocessorConfig."""
    _, gh, gw = (int(v) for v in grid_thw[0])
    if "shapes" in sample.meta:
        return token_labels(sample.meta["shapes"], sample.image.size, (gh, gw), pre_cfg.patch_size,
                            pre_cfg.merge_size)
    labels = unlabelled(gh * gw // pre_cfg.merge_size ** 2)
    if "char_spans" in sample.meta:
        labels[:, SHAPE_COLUMNS:] = text_labels(sample.answer, sample.meta["char_spans"], sample.meta["text_box"],
                                                sample.image.size, (gh, gw), pre_cfg.patch_size, pre_cfg.merge_size)
    return labels


def char_class(c: str) -> int:
    i = CHARS.find(c)
    return OTHER_CHAR if i < 0 else 1 + i


def text_labels(text: str, spans: list[tuple[float, float]], box: tuple[int, int, int, int],
                image_size: tuple[int, int], grid_hw: tuple[int, int], patch_size: int,
                merge_size: int) -> torch.Tensor:
    """LongTensor[M, CHAR_POINTS] per merged token (raster order): the class of the character whose pen span
    holds each of CHAR_POINTS evenly spaced points across the token, BACKGROUND where none does or the token is
    off the text's rows (it must cover at least half the text's height, or half its own, to be on them).
    `spans` and `box` are in pixels of the original image of `image_size`; `grid_hw` the resized patch grid."""
    W, H = image_size
    gh, gw = grid_hw
    rows, cols = gh // merge_size, gw // merge_size
    sx, sy = gw * patch_size / W, gh * patch_size / H                # original -> resized pixels
    top, bottom = box[1] * sy, box[3] * sy
    side = patch_size * merge_size
    row_top = np.arange(rows) * side
    overlap = np.minimum(row_top + side, bottom) - np.maximum(row_top, top)
    on_text = overlap >= 0.5 * min(bottom - top, side)                # [rows]
    column_x = (np.arange(cols * CHAR_POINTS) + 0.5) * side / CHAR_POINTS       # every point, left to right
    starts = np.array([a for a, _ in spans]) * sx
    ends = np.array([b for _, b in spans]) * sx
    inside = (column_x[:, None] >= starts[None]) & (column_x[:, None] < ends[None])      # [points, chars]
    which = np.where(inside.any(1), inside.argmax(1), -1)                             # [points] char index
    # a character narrower than the points' spacing (i, l, ' at the smallest sizes) can fall between two
    # points: it takes the point nearest its centre from a neighbour that holds more than one
    for j in np.flatnonzero(~inside.any(0)):
        p = int(np.abs(column_x - (starts[j] + ends[j]) / 2).argmin())
        if which[p] < 0 or (which == which[p]).sum() > 1:
            which[p] = j
    classes = np.array([char_class(c) for c in text])
    under = np.where(which >= 0, classes[which], BACKGROUND)
    per_token = under.reshape(cols, CHAR_POINTS)
    labels = np.where(on_text[:, None, None], per_token[None], BACKGROUND)          # [rows, cols, CHAR_POINTS]
    return torch.from_numpy(labels.reshape(rows * cols, CHAR_POINTS).astype(np.int64))


def token_places(grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """float[M, 4] per merged token, images (and frames) in order: the token centre's x and y as fractions of
    its image's width and height, and the image's width and height in tokens."""
    rows = []
    for t, gh, gw in grid_thw.tolist():
        h, w = gh // merge_size, gw // merge_size
        cy, cx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
        one = torch.stack([cx.flatten() / w, cy.flatten() / h,
                           torch.full((h * w,), float(w)), torch.full((h * w,), float(h))], 1)
        rows.append(one.repeat(t, 1))
    return torch.cat(rows).to(grid_thw.device) if rows else torch.zeros(0, 4, device=grid_thw.device)


def shape_boxes(labels: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
    """labels[M, LABEL_COLUMNS] of shape tokens, places[M, 4] (token_places) -> float[M, 4]: each token's shape's box
    (x1, y1, x2, y2) as fractions of the image's width and height, from the token's centre and its edges."""
    edges = labels[:, 2:6].float() / EDGE_SCALE                                   # tokens: left, top, right, bottom
    size = places[:, 2:4].repeat(1, 2)                                            # cols, rows, cols, rows
    centre = places[:, :2].repeat(1, 2)
    return centre + torch.cat([-edges[:, :2], edges[:, 2:]], 1) / size


class VisionProbe(nn.Module):
    """Linear classifiers of colour, kind and same-kind count, and a regressor of the distances to the shape's
    edges, over the merged image tokens (the language model's inputs); and regressors of each image token's
    place and its shape's box over the language model's hidden state after LM_PROBE_LAYER."""

    def __init__(self, width: int):
        super().__init__()
        self.colour = nn.Linear(width, 1 + len(COLORS))
        self.kind = nn.Linear(width, 1 + len(SHAPES))
        self.edges = nn.Linear(width, 4)
        self.count = nn.Linear(width, 1 + MAX_SAME_KIND)
        self.place = nn.Linear(width, 2)      # language-model side: the token's own x, y
        self.box = nn.Linear(width, 4)        # language-model side: its shape's x1, y1, x2, y2
        self.chars = nn.Linear(width, CHAR_POINTS * (OTHER_CHAR + 1))   # the characters under its points

    def position_loss(self, hidden: torch.Tensor, labels: torch.Tensor, places: torch.Tensor) -> torch.Tensor:
        """hidden[M, D] (language model, image tokens), labels[M, LABEL_COLUMNS], places[M, 4] (token_places) -> L1
        error in tenths of the image side of every labelled token's place, plus its shape's box on shape tokens."""
        keep = labels[:, 0] != IGNORE
        if not bool(keep.any()):
            return hidden.sum() * 0.0
        x, y, where = hidden[keep].float(), labels[keep], places[keep]
        error = (self.place(x) - where[:, :2] * POSITION_SCALE).abs().mean(1)
        on_shape = y[:, 6] != IGNORE
        if bool(on_shape.any()):
            box = shape_boxes(y[on_shape], where[on_shape])
            box_error = (self.box(x[on_shape]) - box * POSITION_SCALE).abs().mean(1)
            error = torch.cat([error[~on_shape], error[on_shape] + box_error])
        return error.mean()

    def loss(self, vision: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """vision[M, D], labels[M, LABEL_COLUMNS] -> the shape scenes' loss (shape_loss) plus the reading scenes'
        weighted cross-entropy of the characters under each token's points (each 0 when no token of its kind is
        labelled)."""
        total = self.shape_loss(vision, labels)
        on_text = labels[:, SHAPE_COLUMNS] != IGNORE
        if bool(on_text.any()):
            y = labels[on_text, SHAPE_COLUMNS:].reshape(-1)                        # [T * CHAR_POINTS]
            logits = self.chars(vision[on_text].float()).reshape(len(y), OTHER_CHAR + 1)
            weight = torch.where(y == BACKGROUND, BACKGROUND_WEIGHT, 1.0)
            total = total + (F.cross_entropy(logits, y, reduction="none") * weight).sum() / weight.sum()
        return total

    def shape_loss(self, vision: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """vision[M, D], labels[M, LABEL_COLUMNS] -> weighted cross-entropy of the class heads plus, on shape tokens,
        the count head's cross-entropy and the edge head's L1 error in tokens (0 when nothing is labelled)."""
        keep = labels[:, 0] != IGNORE
        if not bool(keep.any()):
            return vision.sum() * 0.0
        x, y = vision[keep].float(), labels[keep]
        weight = torch.where(y[:, 0] == BACKGROUND, BACKGROUND_WEIGHT, 1.0)
        total = F.cross_entropy(self.colour(x), y[:, 0], reduction="none") \
            + F.cross_entropy(self.kind(x), y[:, 1], reduction="none")
        on_shape = y[:, 6] != IGNORE          # (an edge distance may be -1, so not tested for IGNORE)
        shape_only = torch.zeros_like(total)
        if bool(on_shape.any()):
            xs = x[on_shape]
            edge_error = (self.edges(xs) - y[on_shape, 2:6].float() / EDGE_SCALE).abs().mean(1)
            count = F.cross_entropy(self.count(xs), y[on_shape, 6], reduction="none")
            shape_only[on_shape] = EDGE_WEIGHT * edge_error + count
        return ((total + shape_only) * weight).sum() / weight.sum()
