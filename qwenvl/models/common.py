"""Pieces every family's top-level model shares."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LMHead:
    """compute_logits for a model holding `model.language_model.embed_tokens` and, untied, `lm_head`."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden[N, D] -> logits[N, V] float32."""
        lm = self.model.language_model
        w = lm.embed_tokens.weight if self.cfg.text.tie_word_embeddings else self.lm_head.weight
        return F.linear(hidden, w).float()
