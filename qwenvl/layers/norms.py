"""Normalisation layers shared by the model families."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels


class RMSNorm(nn.Module):
    """Root-mean-square norm; the statistic is taken in float32 so bfloat16 models stay stable."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        isa = _kernel_isa(x, self.weight)
        if isa is not None:
            return kernels.add_rms_norm(x.reshape(-1, x.shape[-1]), None, self.weight, self.eps, isa)[1].view(x.shape)
        # PyTorch's fused kernel takes the statistic in float32 and returns x's dtype: the same numbers as
        # float(x) * rsqrt(mean(float(x)^2) + eps) cast back (bit for bit in bf16), in one op instead of
        # seven, which counts at decode (two norms per layer per token). The weight multiplies after the
        # cast back, as the checkpoints were trained.
        return self.weight * F.rms_norm(x, self.weight.shape, None, self.eps)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, self(x + delta)): a decoder layer's residual add and the norm after it.

        On a CPU with qwenvl's kernels (csrc/decode_ops_kernel.hpp) both are one call that reads the rows
        once; PyTorch's path costs an add, F.rms_norm and the weight's multiply, ~50-60 us together at
        decode whatever the width (2 per layer). The numbers are the PyTorch path's up to the order of the
        statistic's float32 sum (reference.add_rms_norm states the bound)."""
        if x.dim() == 2 and delta.shape == x.shape and delta.dtype == x.dtype and delta.stride(-1) == 1:
            isa = _kernel_isa(x, self.weight)
            if isa is not None:
                return kernels.add_rms_norm(x, delta, self.weight, self.eps, isa)
        x = x + delta
        return x, self(x)


def _kernel_isa(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """The kernels' ISA where they compute this norm (CPU, float32 / bfloat16 in the weight's dtype, no
    gradient), else None."""
    if x.dtype == weight.dtype and x.dtype in _DTYPES and x.device.type == "cpu" and x.stride(-1) == 1 \
            and x.numel() > 0 and weight.dim() == 1 \
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return kernels.decode_ops_isa()
    return None


_DTYPES = (torch.float32, torch.bfloat16)


def layer_norm(dim: int) -> nn.LayerNorm:
    """The ViT LayerNorm of Qwen2-VL (eps 1e-6, not torch's 1e-5 default)."""
    return nn.LayerNorm(dim, eps=1e-6)
