"""LoRA for fine-tuning: low-rank adapters beside the LM's projections, merged back before saving.

Merging keeps the saved folder an ordinary checkpoint: the same loader, engine and transformers read it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

LM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B(A(x)); only A and B train. B starts at zero: training starts at base."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype) * self.scale

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            delta = (self.lora_b.float() @ self.lora_a.float()) * self.scale
            self.base.weight += delta.to(self.base.weight.dtype)
        return self.base


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None) -> int:
    """Freeze the model and wrap the language model's projections; -> number of wrapped layers."""
    for p in model.parameters():
        p.requires_grad_(False)
    count = 0
    for module in list(model.model.language_model.modules()):
        for name, child in list(module.named_children()):
            if name in LM_TARGETS and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha or 2 * rank))
                count += 1
    return count


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight and restore plain nn.Linear modules (names = checkpoint keys)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
