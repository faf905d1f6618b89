"""Normalisation layers shared by the model families."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm; the statistic is taken in float32 so bfloat16 models stay stable."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # PyTorch's fused kernel takes the statistic in float32 and returns x's dtype: the same numbers as
        # float(x) * rsqrt(mean(float(x)^2) + eps) cast back (bit for bit in bf16), in one op instead of
        # seven, which counts at decode (two norms per layer per token). The weight multiplies after the
        # cast back, as the checkpoints were trained.
        return self.weight * F.rms_norm(x, self.weight.shape, None, self.eps)


def layer_norm(dim: int) -> nn.LayerNorm:
    """The ViT LayerNorm of Qwen2-VL (eps 1e-6, not torch's 1e-5 default)."""
    return nn.LayerNorm(dim, eps=1e-6)
