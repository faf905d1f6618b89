"""Dense labels for the vision tower: which shape (colour, kind, box) each merged image token shows.

A from-scratch vision-language model learns to look slowly: at first the language model attends to the
image tokens almost uniformly, so the answer sees their mean, where one shape is a few tokens among a
hundred of background, and the gradient reaching the vision tower is diluted the same way. Measured with
scripts/vision_pooling_probe.py: a new vision tower under a max-pool head learns a lone shape's colour in
about 40 steps of 32 images; under a mean-pool head it is still at chance after 60. A per-token label (the
colour and kind of the shape a token shows, or background) gives every token its own gradient from the
first step, so the tower learns features the language model can pick out. The labels come free from the
scene the generator drew.

Each shape token also learns its shape's box on the 0..1000 grid (the grounding answer's numbers): the
vision tower's rotary positions are relative, so nothing else makes a token know where it is in the image;
with the box in the token's features, grounding is "find the tokens, read their box out". The answer
writes the box digit by digit, so the box is also learnt as classes of its hundreds and tens digits: a
linear read-out of "the tens digit of x1" is what the language model's output head needs, where a linear
box coordinate would still need turning into digits.

Each shape token also learns how many shapes of its own kind the scene holds: a counting question then
becomes what the colour question already is, "find a token of that kind, read its label out", instead of
an aggregation over the image that a few-layer language model's softmax attention does poorly.

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

from .synthetic import Sample, to_grid
from .synthetic_scenes import SHAPES, Shape, draw_shape
from .synthetic_style import COLORS

IGNORE = -1                 # a token with no label (an image that is not a shape scene)
BACKGROUND = 0              # classes: 0 background, then 1 + index in COLORS / SHAPES
MIN_PIXELS_PER_TOKEN = 20   # a token shows a shape when at least this many of its pixels are the shape's ink
BACKGROUND_WEIGHT = 0.2     # background tokens are most of an image; they count less in the loss
BOX_WEIGHT = 5.0            # the box head's L1 error is on a 0..1 scale, the classes' cross-entropy ~1
LABEL_COLUMNS = 7           # colour class, kind class, x1, y1, x2, y2 (0..1000 grid), same-kind count
                            # (box and count IGNORE off shapes)
MAX_SAME_KIND = 8           # count classes 0..8 (a scene holds at most 8 shapes)
BOX_DIGIT_CLASSES = (11, 10)  # a grid coordinate's hundreds (0..10: 1000 -> 10) and tens digit


def token_labels(shapes: list[Shape], image_size: tuple[int, int], grid_hw: tuple[int, int],
                 patch_size: int, merge_size: int) -> torch.Tensor:
    """LongTensor[M, 7] (colour class, kind class, box on the 0..1000 grid, number of shapes of its kind in
    the scene) per merged token, in the merger's raster order; a background token's box and count are IGNORE.

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
    box = torch.full((len(blocks), 4), IGNORE, dtype=torch.long)
    same_kind = torch.full((len(blocks), 1), IGNORE, dtype=torch.long)
    if shapes:
        best = counts.argmax(1)
        shown = counts.max(1) >= MIN_PIXELS_PER_TOKEN
        colour_of = np.array([1 + COLORS.index(s.color) for s in shapes])
        kind_of = np.array([1 + SHAPES.index(s.kind) for s in shapes])
        colour = torch.from_numpy(np.where(shown, colour_of[best], BACKGROUND))
        kind = torch.from_numpy(np.where(shown, kind_of[best], BACKGROUND))
        box_of = np.array([to_grid(s.box, image_size) for s in shapes])
        box = torch.from_numpy(np.where(shown[:, None], box_of[best], IGNORE))
        count_of = np.array([sum(o.kind == s.kind for o in shapes) for s in shapes])
        same_kind = torch.from_numpy(np.where(shown, count_of[best], IGNORE))[:, None]
    return torch.cat([torch.stack([colour, kind], 1), box, same_kind], 1)


def unlabelled(num_tokens: int) -> torch.Tensor:
    return torch.full((num_tokens, LABEL_COLUMNS), IGNORE, dtype=torch.long)


def sample_labels(sample: Sample, grid_thw: torch.Tensor, pre_cfg) -> torch.Tensor:
    """The labels of a synthetic sample's image tokens, seen as `grid_thw` ([1, 3]) patches; unlabelled
    when the sample is not a shape scene. `pre_cfg`: the checkpoint's PreprocessorConfig."""
    _, gh, gw = (int(v) for v in grid_thw[0])
    if "shapes" not in sample.meta:
        return unlabelled(gh * gw // pre_cfg.merge_size ** 2)
    return token_labels(sample.meta["shapes"], sample.image.size, (gh, gw), pre_cfg.patch_size, pre_cfg.merge_size)


def box_digit_classes(box: torch.Tensor) -> list[torch.Tensor]:
    """[N, 4] grid coordinates -> 8 LongTensor[N] of digit classes: the hundreds of x1, y1, x2, y2, then
    their tens (the order of VisionProbe.box_digits)."""
    return list((box // 100).T) + list((box // 10 % 10).T)


class VisionProbe(nn.Module):
    """Linear classifiers of colour, kind, same-kind count and box digits, and a box regressor, over the
    merged image tokens (the language model's inputs)."""

    def __init__(self, width: int):
        super().__init__()
        self.colour = nn.Linear(width, 1 + len(COLORS))
        self.kind = nn.Linear(width, 1 + len(SHAPES))
        self.box = nn.Linear(width, 4)
        self.count = nn.Linear(width, 1 + MAX_SAME_KIND)
        self.box_digits = nn.ModuleList(nn.Linear(width, n) for n in BOX_DIGIT_CLASSES for _ in range(4))

    def loss(self, vision: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """vision[M, D], labels[M, 7] -> weighted cross-entropy of the class heads plus, on shape tokens,
        the count head's cross-entropy, the digit heads' mean cross-entropy and the box head's L1 error
        (0 when nothing is labelled)."""
        keep = labels[:, 0] != IGNORE
        if not bool(keep.any()):
            return vision.sum() * 0.0
        x, y = vision[keep].float(), labels[keep]
        weight = torch.where(y[:, 0] == BACKGROUND, BACKGROUND_WEIGHT, 1.0)
        total = F.cross_entropy(self.colour(x), y[:, 0], reduction="none") \
            + F.cross_entropy(self.kind(x), y[:, 1], reduction="none")
        on_shape = y[:, 2] != IGNORE
        shape_only = torch.zeros_like(total)
        if bool(on_shape.any()):
            xs, box = x[on_shape], y[on_shape, 2:6]
            box_error = (self.box(xs) - box.float() / 1000).abs().sum(1)
            digits = sum(F.cross_entropy(head(xs), d, reduction="none")
                         for head, d in zip(self.box_digits, box_digit_classes(box), strict=True))
            count = F.cross_entropy(self.count(xs), y[on_shape, 6], reduction="none")
            shape_only[on_shape] = BOX_WEIGHT * box_error + digits / len(self.box_digits) + count
        return ((total + shape_only) * weight).sum() / weight.sum()
