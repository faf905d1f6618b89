"""FP8 block layout (Qwen3-VL-*-FP8, DeepSeek-style; facts from transformers/integrations/
finegrained_fp8.py: FP8Linear's parameters and _dequantize_fp8_weight): weight float8_e4m3fn [out, in],
weight_scale_inv fp32 [ceil(out/B), ceil(in/B)] with B = weight_block_size (128); w = weight *
weight_scale_inv of its block. Activations are quantised dynamically by the original kernels; qwenvl
dequantises the weight to the model dtype instead (qwenvl/prequantized.py says why).
"""
from __future__ import annotations

import torch


def _expand(scale_inv: torch.Tensor, shape, block) -> torch.Tensor:
    out, inp = shape
    return scale_inv.repeat_interleave(block[0], 0)[:out].repeat_interleave(block[1], 1)[:, :inp]


def quantize_fp8(w: torch.Tensor, block=(128, 128)):
    """Packer for tests: float [out, in] -> (weight e4m3 [out, in], weight_scale_inv fp32 blocks)."""
    out, inp = w.shape
    bo, bi = -(-out // block[0]), -(-inp // block[1])
    pad = torch.zeros(bo * block[0], bi * block[1])
    pad[:out, :inp] = w.float()
    amax = pad.reshape(bo, block[0], bi, block[1]).abs().amax(dim=(1, 3))   # [bo, bi]
    scale_inv = (amax / torch.finfo(torch.float8_e4m3fn).max).clamp(min=1e-12)
    q = (w.float() / _expand(scale_inv, w.shape, block)).to(torch.float8_e4m3fn)
    return q, scale_inv


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    return weight.float() * _expand(scale_inv.float(), weight.shape, block)
