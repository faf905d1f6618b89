"""What makes a model family a family, in one record per folder (`models/<family>/family.py`).

A family says how its config.json reads (vision fields, text defaults, extra text fields), which model
class runs it, and how its videos enter the prompt. `models/registry.py` lists the families: a new
family is one new folder plus one line there.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from .config import ConfigError, VisionConfig, require


@dataclass(frozen=True)
class TextDefaults:
    """Text-config fields a family's files may leave out."""
    mrope_interleaved: bool = False   # Qwen3-VL interleaves t/h/w frequencies; Qwen2/2.5 use chunks
    attention_bias: bool = True       # q/k/v bias (Qwen2/2.5); Qwen3 has none but q/k RMSNorm
    qk_norm: bool = False


@dataclass(frozen=True)
class Family:
    model_type: str
    model_class: str                                  # "module:Class", imported when a model is built
    read_vision: Callable[[dict, int, str], VisionConfig]   # (vision_config, LLM width, source) -> VisionConfig
    text_defaults: TextDefaults = field(default_factory=TextDefaults)
    read_text_extra: Callable[[dict, str], dict] | None = None   # extra TextConfig fields (MoE)
    video_timestamps: bool = False          # Qwen3-VL: `<t seconds>` text before each temporal patch
    video_time_in_positions: bool = False   # Qwen2.5-VL: the M-RoPE time axis counts real seconds

    def build(self, cfg):
        module, name = self.model_class.split(":")
        return getattr(importlib.import_module(module), name)(cfg)


def read_windowed_vision(vis_raw: dict, llm_width: int, source: str) -> VisionConfig:
    """The vision_config of Qwen2.5-VL and Qwen3-VL: `hidden_size` is the ViT width, the merger's output
    `out_hidden_size`; window attention (2.5) and position embeddings / deepstack (3) where present."""
    def need(key):
        return require(vis_raw, key, "vision_config.", source)
    return VisionConfig(
        depth=need("depth"), width=need("hidden_size"), num_heads=need("num_heads"),
        intermediate_size=need("intermediate_size"), out_hidden_size=need("out_hidden_size"),
        patch_size=vis_raw.get("patch_size", 14),
        temporal_patch_size=vis_raw.get("temporal_patch_size", 2),
        spatial_merge_size=vis_raw.get("spatial_merge_size", 2),
        in_channels=vis_raw.get("in_chans", vis_raw.get("in_channels", 3)),
        hidden_act=vis_raw.get("hidden_act", "silu"),
        window_size=vis_raw.get("window_size", 0),
        fullatt_block_indexes=tuple(vis_raw.get("fullatt_block_indexes", ())),
        tokens_per_second=float(vis_raw.get("tokens_per_second", 0)),
        num_position_embeddings=vis_raw.get("num_position_embeddings", 0),
        deepstack_visual_indexes=tuple(vis_raw.get("deepstack_visual_indexes", ())),
    )


def positive_int(raw: dict, key: str, source: str, default=None) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{source}: text_config.{key} must be a positive integer, got {value!r}")
    return value
