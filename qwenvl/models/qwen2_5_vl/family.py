"""Qwen2.5-VL as a family: window-attention ViT; a video's M-RoPE time axis counts real seconds."""

from __future__ import annotations

from ..family import Family, read_windowed_vision

FAMILY = Family(model_type="qwen2_5_vl", model_class="qwenvl.models.qwen2_5_vl.model:Qwen2_5_VLModel",
                read_vision=read_windowed_vision, video_time_in_positions=True)
