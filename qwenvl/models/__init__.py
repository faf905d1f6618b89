"""The model families: config dataclasses (`config.py`), one folder per family, and the registry that reads a
`config.json` into the right family. A lower room: imports layers/ and kernels/, never anything above.

`build_model(cfg)` picks the family's module; every family has the same interface:
`encode_vision`, `forward(input_ids, positions[3, N], attn, vision_embeds, deepstack)`, `compute_logits`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:                      # importing qwenvl.models.config stays free of torch
    from torch import nn

    from .config import ModelConfig


def build_model(cfg: "ModelConfig") -> "nn.Module":
    """An uninitialised model for `cfg` (build it under `torch.device("meta")` and load weights after)."""
    from .registry import family_of    # the families import torch; only building a model needs them
    return family_of(cfg.model_type).build(cfg)
