"""Qwen3-VL: vision tower + Qwen3 decoder with DeepStack, behind the family interface of
docs/internals.md (`encode_vision`, `forward`, `compute_logits`).

Module names equal the transformers 5.x checkpoint keys: `model.visual.*`,
`model.language_model.*`, `lm_head.*`.
"""

from __future__ import annotations

import torch
from torch import nn

from qwenvl.models.config import ModelConfig
from qwenvl.models.common import LMHead

from .text import Qwen3VLTextModel
from .vision import Qwen3VLVisionModel


class _Body(nn.Module):
    """The `model.` prefix of the checkpoint keys."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.visual = Qwen3VLVisionModel(cfg.vision)
        self.language_model = Qwen3VLTextModel(cfg.text)


class Qwen3VLModel(LMHead, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vision.out_hidden_size != cfg.text.hidden_size:
            raise ValueError(f"vision_config.out_hidden_size={cfg.vision.out_hidden_size} must equal "
                             f"text hidden_size={cfg.text.hidden_size}")
        if len(cfg.vision.deepstack_visual_indexes) > cfg.text.num_hidden_layers:
            raise ValueError(f"{len(cfg.vision.deepstack_visual_indexes)} DeepStack features but only "
                             f"{cfg.text.num_hidden_layers} LM layers to add them to")
        self.cfg = cfg
        self.model = _Body(cfg)
        if not cfg.text.tie_word_embeddings:
            # Tied checkpoints reuse embed_tokens and hold no lm_head (the loader's convention).
            self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)

    def encode_vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """pixel_values[P, C*T*ps*ps] (merge-block order), grid_thw[n, 3] ->
        (embeds[M, D], deepstack: one [M, D] per deepstack_visual_indexes entry)."""
        return self.model.visual(pixel_values, grid_thw)

    def encode_vision_stages(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        """encode_vision as a generator paused after each tower block (see Qwen2VLModel's)."""
        return (yield from self.model.visual.stages(pixel_values, grid_thw))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn,
                vision_embeds: torch.Tensor | None = None,
                deepstack: list[torch.Tensor] | None = None) -> torch.Tensor:
        """input_ids[N], positions[3, N] -> final-normed hidden[N, D].

        vision_embeds[K, D] replace, in order, the embeddings of the K image/video pad tokens in
        input_ids; deepstack[i][K, D] (same rows) is added after LM layer i."""
        lm = self.model.language_model
        x = lm.embed_tokens(input_ids)                                        # [N, D]
        deepstack = deepstack or []
        mask = None
        if vision_embeds is not None or deepstack:
            mask = (input_ids == self.cfg.image_token_id) | (input_ids == self.cfg.video_token_id)
            k = int(mask.sum())
            rows = [t.shape[0] for t in ([vision_embeds] if vision_embeds is not None else []) + deepstack]
            if any(r != k for r in rows):
                raise ValueError(f"input_ids hold {k} image/video pad tokens but the vision rows given "
                                 f"number {rows}; pass exactly the rows for the pads in this chunk")
            if vision_embeds is not None:
                want = len(self.cfg.vision.deepstack_visual_indexes)
                if len(deepstack) != want:
                    # Dropping them would still run but silently degrade every answer.
                    raise ValueError(f"Qwen3-VL needs {want} DeepStack feature tensors with the vision "
                                     f"embeddings (from encode_vision), got {len(deepstack)}")
                x = x.index_put((mask,), vision_embeds.to(x.dtype))
        return lm(x, positions, attn, mask, deepstack)
