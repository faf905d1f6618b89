"""Normalisation layers shared by the model families."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm; the statistic is taken in float32 so bfloat16 models stay stable."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        # Cast back before the weight multiply, as the checkpoints were trained that way.
        return self.weight * xf.to(dtype)


def layer_norm(dim: int) -> nn.LayerNorm:
    """The ViT LayerNorm of Qwen2-VL (eps 1e-6, not torch's 1e-5 default)."""
    return nn.LayerNorm(dim, eps=1e-6)
