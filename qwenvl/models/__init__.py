"""Model families. `build_model(cfg)` picks the family's module; every family has the same interface:
`encode_vision`, `forward(input_ids, positions[3, N], attn, vision_embeds, deepstack)`, `compute_logits`."""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig


def build_model(cfg: ModelConfig) -> nn.Module:
    """An uninitialised model for `cfg` (build it under `torch.device("meta")` and load weights after)."""
    from .registry import family_of
    return family_of(cfg.model_type).build(cfg)
