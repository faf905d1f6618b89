"""Qwen2.5-VL: the Qwen2-VL model with the window-attention vision tower; the LM is the same Qwen2."""

from __future__ import annotations

from ..qwen2_vl.model import Qwen2VLModel
from .vision import VisionTransformer


class Qwen2_5_VLModel(Qwen2VLModel):
    vision_class = VisionTransformer
