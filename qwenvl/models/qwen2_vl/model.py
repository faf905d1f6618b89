"""Qwen2-VL: vision tower + Qwen2 LM, with the model interface every family shares (docs/internals.md)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..common import LMHead
from ...layers.attention import AttentionBackend
from .text import TextModel
from .vision import VisionTransformer


class Qwen2VLModel(LMHead, nn.Module):
    """Module names follow the transformers 5.x checkpoint keys: model.visual.*, model.language_model.*, lm_head.*"""

    vision_class = VisionTransformer

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()
        self.model.visual = self.vision_class(cfg.vision)
        self.model.language_model = TextModel(cfg.text)
        if not cfg.text.tie_word_embeddings:  # tied checkpoints reuse embed_tokens and hold no lm_head
            self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    def encode_vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixel_values[P, C*T*ps*ps], grid_thw[n, 3] -> (embeds[M, D], deepstack=[]); images in order."""
        return self.model.visual(pixel_values, grid_thw), []

    def encode_vision_stages(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        """encode_vision as a generator that pauses after each tower block (yielding the patch rows it ran)
        and returns what encode_vision returns, bit for bit: the engine runs a tower a slice per step."""
        embeds = yield from self.model.visual.stages(pixel_values, grid_thw)
        return embeds, []

    def _vision_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids == self.cfg.image_token_id) | (input_ids == self.cfg.video_token_id)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend,
                vision_embeds: torch.Tensor | None = None, deepstack: list[torch.Tensor] = ()) -> torch.Tensor:
        """input_ids[N], positions[3, N] -> final-normed hidden[N, D].

        The rows of vision_embeds[K, D] replace the embeddings of the K image/video pad tokens, in order.
        """
        lm = self.model.language_model
        x = lm.embed_tokens(input_ids)                                         # [N, D]
        mask = self._vision_mask(input_ids)
        if vision_embeds is not None:
            k = int(mask.sum())
            if k != vision_embeds.shape[0]:
                raise ValueError(f"{k} image/video pad tokens in input_ids but {vision_embeds.shape[0]} vision rows")
            x = x.index_put((mask,), vision_embeds.to(x.dtype))
        return lm(x, positions, attn, mask, deepstack)
