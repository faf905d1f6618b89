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
with the box in the token's features, grounding is "find the tokens, read their box out".

`VisionProbe` holds the three linear heads; they live only in training (saved in train_state.pt for resume,
never in the exported checkpoint).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from .synthetic import to_grid
from .synthetic_scenes import SHAPES, Shape, draw_shape
from .synthetic_style import COLORS

IGNORE = -1                 # a token with no label (an image that is not a shape scene)
BACKGROUND = 0              # classes: 0 background, then 1 + index in COLORS / SHAPES
MIN_PIXELS_PER_TOKEN = 20   # a token shows a shape when at least this many of its pixels are the shape's ink
BACKGROUND_WEIGHT = 0.2     # background tokens are most of an image; they count less in the loss
BOX_WEIGHT = 5.0            # the box head's L1 error is on a 0..1 scale, the classes' cross-entropy ~1
LABEL_COLUMNS = 6           # colour class, kind class, x1, y1, x2, y2 (0..1000 grid; IGNORE off shapes)


def token_labels(shapes: list[Shape], image_size: tuple[int, int], grid_hw: tuple[int, int],
                 patch_size: int, merge_size: int) -> torch.Tensor:
    """LongTensor[M, 6] (colour class, kind class, box on the 0..1000 grid) per merged token, in the
    merger's raster order; a background token's box is IGNORE.

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
    if shapes:
        best = counts.argmax(1)
        shown = counts.max(1) >= MIN_PIXELS_PER_TOKEN
        colour_of = np.array([1 + COLORS.index(s.color) for s in shapes])
        kind_of = np.array([1 + SHAPES.index(s.kind) for s in shapes])
        colour = torch.from_numpy(np.where(shown, colour_of[best], BACKGROUND))
        kind = torch.from_numpy(np.where(shown, kind_of[best], BACKGROUND))
        box_of = np.array([to_grid(s.box, image_size) for s in shapes])
        box = torch.from_numpy(np.where(shown[:, None], box_of[best], IGNORE))
    return torch.cat([torch.stack([colour, kind], 1), box], 1)


def unlabelled(num_tokens: int) -> torch.Tensor:
    return torch.full((num_tokens, LABEL_COLUMNS), IGNORE, dtype=torch.long)


class VisionProbe(nn.Module):
    """Linear colour and kind classifiers and a box regressor over the merged image tokens (the language
    model's inputs)."""

    def __init__(self, width: int):
        super().__init__()
        self.colour = nn.Linear(width, 1 + len(COLORS))
        self.kind = nn.Linear(width, 1 + len(SHAPES))
        self.box = nn.Linear(width, 4)

    def loss(self, vision: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """vision[M, D], labels[M, 6] -> weighted cross-entropy of the class heads plus the box head's L1
        error on shape tokens (0 when nothing is labelled)."""
        keep = labels[:, 0] != IGNORE
        if not bool(keep.any()):
            return vision.sum() * 0.0
        x, y = vision[keep].float(), labels[keep]
        weight = torch.where(y[:, 0] == BACKGROUND, BACKGROUND_WEIGHT, 1.0)
        total = F.cross_entropy(self.colour(x), y[:, 0], reduction="none") \
            + F.cross_entropy(self.kind(x), y[:, 1], reduction="none")
        on_shape = y[:, 2] != IGNORE
        box_error = torch.zeros_like(total)
        if bool(on_shape.any()):
            box_error[on_shape] = (self.box(x[on_shape]) - y[on_shape, 2:].float() / 1000).abs().sum(1)
        return ((total + BOX_WEIGHT * box_error) * weight).sum() / weight.sum()
