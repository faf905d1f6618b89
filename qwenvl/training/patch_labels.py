"""Dense labels for the vision tower: which shape (colour, kind) each merged image token shows.

A from-scratch vision-language model learns to look slowly: at first the language model attends to the
image tokens almost uniformly, so the answer sees their mean, where one shape is a few tokens among a
hundred of background, and the gradient reaching the vision tower is diluted the same way. Measured here
(scripts in the README's model card): a vision tower under a max-pool head learns a lone shape's colour in
50 steps, under a mean-pool head it stays at chance. A per-token label (the colour and kind of the shape
a token shows, or background) gives every token its own gradient from the first step, so the tower learns
features the language model can pick out. The labels come free from the scene the generator drew.

`VisionProbe` holds the two linear heads; they live only in training (saved in train_state.pt for resume,
never in the exported checkpoint).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import nn

from .synthetic_scenes import SHAPES, Shape, draw_shape
from .synthetic_style import COLORS

IGNORE = -1                 # a token with no label (an image that is not a shape scene)
BACKGROUND = 0              # classes: 0 background, then 1 + index in COLORS / SHAPES
MIN_PIXELS_PER_TOKEN = 20   # a token shows a shape when at least this many of its pixels are the shape's ink
BACKGROUND_WEIGHT = 0.2     # background tokens are most of an image; they count less in the loss


def token_labels(shapes: list[Shape], image_size: tuple[int, int], grid_hw: tuple[int, int],
                 patch_size: int, merge_size: int) -> torch.Tensor:
    """LongTensor[M, 2] (colour class, kind class) per merged token, in the merger's raster order.

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
    if shapes:
        best = counts.argmax(1)
        shown = counts.max(1) >= MIN_PIXELS_PER_TOKEN
        colour_of = np.array([1 + COLORS.index(s.color) for s in shapes])
        kind_of = np.array([1 + SHAPES.index(s.kind) for s in shapes])
        colour = torch.from_numpy(np.where(shown, colour_of[best], BACKGROUND))
        kind = torch.from_numpy(np.where(shown, kind_of[best], BACKGROUND))
    return torch.stack([colour, kind], 1)


def unlabelled(num_tokens: int) -> torch.Tensor:
    return torch.full((num_tokens, 2), IGNORE, dtype=torch.long)


class VisionProbe(nn.Module):
    """Linear colour and kind classifiers over the merged image tokens (the language model's inputs)."""

    def __init__(self, width: int):
        super().__init__()
        self.colour = nn.Linear(width, 1 + len(COLORS))
        self.kind = nn.Linear(width, 1 + len(SHAPES))

    def loss(self, vision: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """vision[M, D], labels[M, 2] -> weighted cross-entropy of both heads (0 when nothing is labelled)."""
        keep = labels[:, 0] != IGNORE
        if not bool(keep.any()):
            return vision.sum() * 0.0
        x, y = vision[keep].float(), labels[keep]
        weight = torch.where(y[:, 0] == BACKGROUND, BACKGROUND_WEIGHT, 1.0)
        total = F.cross_entropy(self.colour(x), y[:, 0], reduction="none") \
            + F.cross_entropy(self.kind(x), y[:, 1], reduction="none")
        return (total * weight).sum() / weight.sum()
