"""Pieces every family's top-level model shares."""

from __future__ import annotations

from typing import Generator

import torch
import torch.nn.functional as F
from torch import nn


def run_stages(stages: Generator):
    """Drive a vision tower's `stages` generator (it pauses after each block) to its end: its return value."""
    while True:
        try:
            next(stages)
        except StopIteration as done:
            return done.value


class LMHead:
    """compute_logits for a model holding `model.language_model.embed_tokens` and, untied, `lm_head`.

    A module swap (qwenvl/quantize.py) may give a tied model its own output head with `use_output_head`:
    the embedding lookup stays exact while the logits come from the (quantised) copy."""

    def tied_output_weight(self) -> torch.Tensor | None:
        """The embedding matrix when it doubles as the output head, else None."""
        return self.model.language_model.embed_tokens.weight if self.cfg.text.tie_word_embeddings else None

    def use_output_head(self, head: nn.Module) -> None:
        self.output_head = head

    def has_output_head(self) -> bool:
        """Whether use_output_head() gave the model a head of its own (quantised, or the bf16 kernel's)."""
        return "output_head" in self._modules

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden[N, D] -> logits[N, V] float32."""
        if self.has_output_head():
            return self.output_head(hidden).float()
        tied = self.tied_output_weight()
        if tied is not None:
            return F.linear(hidden, tied).float()
        return self.lm_head(hidden).float()
