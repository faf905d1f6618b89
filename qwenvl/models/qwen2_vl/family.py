"""Qwen2-VL as a family: its config.json names the ViT width `embed_dim` (`hidden_size` is the LLM's)."""

from __future__ import annotations

from ..config import VisionConfig, require
from ..family import Family


def read_vision(vis_raw: dict, llm_width: int, source: str) -> VisionConfig:
    def need(key):
        return require(vis_raw, key, "vision_config.", source)
    width = need("embed_dim")
    return VisionConfig(
        depth=need("depth"), width=width, num_heads=need("num_heads"),
        intermediate_size=int(width * vis_raw.get("mlp_ratio", 4)),
        out_hidden_size=vis_raw.get("hidden_size", llm_width),
        patch_size=vis_raw.get("patch_size", vis_raw.get("spatial_patch_size", 14)),
        temporal_patch_size=vis_raw.get("temporal_patch_size", 2),
        spatial_merge_size=vis_raw.get("spatial_merge_size", 2),
        in_channels=vis_raw.get("in_chans", vis_raw.get("in_channels", 3)),
        hidden_act=vis_raw.get("hidden_act", "quick_gelu"),
    )


FAMILY = Family(model_type="qwen2_vl", model_class="qwenvl.models.qwen2_vl.model:Qwen2VLModel",
                read_vision=read_vision)
