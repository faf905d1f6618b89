"""Model families. `build_model(cfg)` picks the family's module; every family has the same interface:
`encode_vision`, `forward(input_ids, positions[3, N], attn, vision_embeds, deepstack)`, `compute_logits`."""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig


def build_model(cfg: ModelConfig) -> nn.Module:
    """An uninitialised model for `cfg` (build it under `torch.device("meta")` and load weights after)."""
    if cfg.model_type == "qwen2_vl":
        from .qwen2_vl.model import Qwen2VLModel
        return Qwen2VLModel(cfg)
    if cfg.model_type == "qwen2_5_vl":
        from .qwen2_5_vl.model import Qwen2_5_VLModel
        return Qwen2_5_VLModel(cfg)
    if cfg.model_type in ("qwen3_vl", "qwen3_vl_moe"):     # MoE: same family, sparse MLP layers
        # Written in qwenvl/models/qwen3_vl/ with the same interface; imported lazily.
        from .qwen3_vl.model import Qwen3VLModel
        return Qwen3VLModel(cfg)
    raise ValueError(f"model_type {cfg.model_type!r} is not supported; expected qwen2_vl, qwen2_5_vl, qwen3_vl or qwen3_vl_moe")
