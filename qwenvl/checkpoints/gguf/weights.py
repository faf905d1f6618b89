"""GGUF tensors -> our tensors and quantised layers, following each tensor's own type.

  F32 / F16 / BF16   float, cast to the model dtype
  Q4_0, Q4_1, Q4_K   Int4Linear, group 32, from the blocks' own codes: every 32 weights share a scale and
                     a min, w = q * scale + min (q 0..15), which is the int4 layer's form; Q4_K keeps its
                     super-blocks (d, dmin per 256, 6-bit sc, m per 32) in the tile layout, the kernel
                     forming scale and min (Int4Linear.from_q4_k: 4.625 bits a weight, not 6 in float32)
  Q8_0               Int8Linear: one scale per 32 weights in the file, one per output row in our layer, so
                     the row is requantised from the exact float values (error below half a row step);
                     in a file mostly of 4 bits, int4 as the next row says
  any other type     dequantised by the `gguf` package (the reference), then requantised: in a file mostly
                     of 4 bits or fewer (Q4_K_M: its Q6_K head and some ffn_down / attn_v) to Int4Linear in
                     the groups `quantization="int4"` uses (128 where the width allows), else to Int8Linear
                     per row (requantised_mode); a 1-D tensor stays float. Q6_K where the kernels run: its
                     values by csrc/q6_k.cpp (gguf's to the bit, multi-threaded), and in the int4 case straight
                     from the blocks into the tiles in one pass (the bytes the path through floats gives)
  expert stacks      (Qwen3-VL-MoE, [E, out, in]) one quantised layer per expert by the same rules, gate
                     and up side by side in one layer (QuantizedExperts); float stacks stay fused tensors

Exactness, per block of 32 (all from the block layouts in ggml-common.h):
  Q4_0  w = d * (q - 8):       scale d (fp16), min -8d: both exact in float32, not in bfloat16
  Q4_1  w = d * q + m:         scale d, min m (fp16): exact in float32, not in bfloat16
  Q4_K  w = d*sc * q - dmin*m: d, dmin fp16 and sc, m 6-bit integers, so scale = d*sc and min = -dmin*m are
                               products of an 11-bit and a 6-bit mantissa: exact in float32 (24 bits), not
                               in bfloat16 (8 bits)
Int4Linear's tile layout (qwenvl's own kernel) stores Q4_K's d, dmin, sc and m as they are and Q4_0 / Q4_1's
scales and mins as given (float32 for a float32 model), so each weight is q * scale + min exactly as gguf
computes it; PyTorch's int4pack layout (the fallback where our kernels do
not run) keeps offset = min + 8 * scale instead, one more float32 rounding.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from ... import kernels
from ...layers.quantized_linear import (LAYOUT_TILES, Int4Linear, Int8Linear, default_int4_layout, int4_group_size,
                                        quantize_int8)

FLOAT_TYPES = ("F32", "F16", "BF16")
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
INT8_TYPES = ("Q8_0",)
# 4 bits a weight or fewer: a file mostly of these is an int4 model (requantised_mode)
LOW_BIT_TYPES = INT4_TYPES + ("Q2_K", "Q3_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS",
                                "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0")
QK = 32               # weights per block (Q4_0, Q4_1, Q8_0) and per Q4_K sub-block
QK_K = 256            # weights per K-quant super-block


def type_name(t) -> str:
    return t.tensor_type.name


def raw_blocks(t) -> torch.Tensor:
    """The tensor's bytes as uint8 [rows, bytes per row], rows over every leading dimension (an expert
    stack's E * out); a copy, as the file stays mapped read-only."""
    data = np.asarray(t.data)
    return torch.from_numpy(np.array(data.reshape(-1, data.shape[-1]), copy=True))


def mapped_blocks(t) -> torch.Tensor:
    """The tensor's bytes as uint8 [rows, bytes per row] without a copy: a read-only view of the mapped file,
    for code that only reads it (the Q4_K repack)."""
    data = np.asarray(t.data)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(data.reshape(-1, data.shape[-1]))


def float_tensor(t, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor in `dtype` (floats as stored, converted once: a BF16 tensor read into a bfloat16 model is a
    copy of its bytes; quantised types through gguf's own dequantisation to float32 first)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    kind = type_name(t)
    if kind in FLOAT_TYPES:
        stored = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[kind]
        with warnings.catch_warnings():        # read-only file mapping: converted (or copied) right away
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            raw = torch.from_numpy(np.asarray(t.data).reshape(-1).view(np.uint8))
        out = raw.view(stored).to(dtype, copy=True)
    elif kind == "Q6_K" and _q6_k_values_in_cpp():      # the same values, multi-threaded C++ (csrc/q6_k.cpp)
        out = kernels.q6_k_dequantize(mapped_blocks(t), int(t.shape[0])).to(dtype)
    else:
        out = torch.from_numpy(dequantize(np.asarray(t.data), GGMLQuantizationType[kind]).astype(np.float32))
        out = out.to(dtype)
    return out.reshape(shape)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2] -> float32 [...] (little-endian fp16)."""
    return b.contiguous().view(torch.float16)[..., 0].float()


def int4_codes(t, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0 / Q4_1 / Q4_K tensor -> (q uint8 [rows, cols] 0..15, scale [rows, cols/32], min [rows, cols/32])
    float32, with w = q * scale + min exactly as ggml dequantises. `rows` counts every leading dimension."""
    kind, b = type_name(t), raw_blocks(t)
    if kind == "Q4_K":
        return _q4_k(b.view(rows, cols // QK_K, 144), rows, cols)
    size = 18 if kind == "Q4_0" else 20
    blk = b.view(rows, cols // QK, size)
    d = _f16(blk[..., 0:2])
    qs = blk[..., size - 16:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(rows, cols)     # element j low nibble, j + 16 high
    m = -8.0 * d if kind == "Q4_0" else _f16(blk[..., 2:4])
    return q, d, m


def _q4_k(blk: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K super-blocks [rows, n, 144] -> (q, scale = d * sc, min = -dmin * m), float32 (exact products)."""
    q, d, neg_dmin, sc, mn = q4_k_fields(blk, rows, cols)
    scale = (d.float()[..., None] * sc.float().view(rows, -1, 8)).reshape(rows, -1)
    mins = (neg_dmin.float()[..., None] * mn.float().view(rows, -1, 8)).reshape(rows, -1)
    return q, scale, mins


def q4_k_fields(blk: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, ...]:
    """Q4_K super-blocks [rows, n, 144]: d, dmin fp16; 12 bytes of 6-bit (scale, min) for 8 sub-blocks;
    128 bytes of nibbles, each 32 bytes holding sub-block 2i in the low nibbles and 2i+1 in the high ones.
    -> (q uint8 [rows, cols], d float16 [rows, n], -dmin float16 [rows, n], sc uint8 [rows, 8 n],
    m uint8 [rows, 8 n]), with w = d * sc * q + (-dmin) * m per sub-block of 32."""
    d = blk[..., 0:2].contiguous().view(torch.float16)[..., 0]
    neg_dmin = -blk[..., 2:4].contiguous().view(torch.float16)[..., 0]      # exact: a sign flip
    s = blk[..., 4:16]                                                       # [rows, n, 12] uint8
    lo, hi = s[..., 0:4], s[..., 8:12]
    sc = torch.cat([lo & 63, (hi & 0x0F) | ((lo >> 6) << 4)], dim=-1)                        # [rows, n, 8]
    mn = torch.cat([s[..., 4:8] & 63, (hi >> 4) | ((s[..., 4:8] >> 6) << 4)], dim=-1)
    qs = blk[..., 16:].reshape(rows, -1, 4, 32)                              # [rows, n, 4 pairs, 32]
    q = torch.stack([qs & 0x0F, qs >> 4], dim=3).reshape(rows, cols)       # pair i: sub-block 2i, then 2i+1
    return q, d, neg_dmin, sc.reshape(rows, -1), mn.reshape(rows, -1)


def q8_0_values(t, rows: int, cols: int) -> torch.Tensor:
    """A Q8_0 tensor's exact values, float32 [rows, cols] (d fp16 times int8: exact in float32)."""
    blk = raw_blocks(t).view(rows, cols // QK, 34)
    d = _f16(blk[..., 0:2])
    q = blk[..., 2:].contiguous().view(torch.int8).float()
    return (q * d[..., None]).reshape(rows, cols)


def requantised_mode(tensors) -> str:
    """"int4" when most quantised weights of the file are 4 bits or fewer (a Q4_K_M, Q4_0, Q3_K... file),
    else "int8": what its other quantised tensors (Q6_K, Q5_0, ...) are requantised to.

    Why: llama-quantize keeps the output head (the tied token table) in Q6_K in a Q4_K_M file, and an int8
    head of 151936 x 1536 costs 131 ms a token here against 45 ms in int4 (bench/gguf_load.py's decode: 0.67x
    of our int4 speed with it int8); qwenvl's own int4 mode quantises the head to int4 as well, in the same
    groups. A file of 5 bits and up (Q5_K_M, Q6_K, Q8_0) keeps 8 bits."""
    counts = {"int4": 0, "int8": 0}
    for t in tensors:
        kind = type_name(t)
        if kind not in FLOAT_TYPES and len(t.shape) >= 2:
            counts["int4" if kind in LOW_BIT_TYPES else "int8"] += int(t.n_elements)
    return "int4" if counts["int4"] > counts["int8"] else "int8"


def linear_from(t, shape: tuple[int, int], dtype: torch.dtype, bias: torch.Tensor | None, other: str = "int8"):
    """The layer for a quantised linear weight tensor of `shape` [out, in] (see the table above); `other`
    (requantised_mode) is what a type without int4 codes becomes."""
    return linears_from([t], shape, dtype, bias, other)[0]


def linears_from(stacked: list, shape: tuple[int, ...], dtype: torch.dtype, bias: torch.Tensor | None = None,
                 other: str = "int8") -> list[nn.Module]:
    """The layers of quantised tensors of one `shape` ([out, in], or [E, out, in] for an expert stack: one
    layer per expert), joined side by side along the output rows (an expert's gate and up in one layer).
    All int4 types keep their codes; any other mix goes through the float values and `other` (int8 per row,
    or int4 in groups of 32)."""
    experts, (rows, cols) = (shape[0] if len(shape) == 3 else 1), shape[-2:]
    kinds = {type_name(t) for t in stacked}
    if kinds == {"Q4_K"} and default_int4_layout() == LAYOUT_TILES:
        # Q4_K's own super-blocks, exact at 4.625 bits a weight, by the kernels' one-pass repack of the bytes
        blocks = [mapped_blocks(t) for t in stacked]                          # [E * rows, bytes] each
        b = None if bias is None else bias.detach().to(dtype)
        layers = []
        for e in range(experts):
            part = [x[e * rows:(e + 1) * rows] for x in blocks]
            joined = part[0] if len(part) == 1 else torch.cat(part)
            packed, params = kernels.q4_k_to_tiles(joined.contiguous(), cols)
            layers.append(Int4Linear(packed, params, joined.shape[0], cols, QK, b, None, dtype))
        return layers
    if kinds == {"Q4_K"}:          # PyTorch's int4pack layout (no kernels here): Int4Linear.from_q4_k
        fields = [[f.view(experts, rows, -1) for f in q4_k_fields(raw_blocks(t).view(experts * rows, cols // QK_K, 144),
                                                                  experts * rows, cols)] for t in stacked]
        q, d, neg_dmin, sc, mn = (torch.cat(parts, dim=1) for parts in zip(*fields))
        return [Int4Linear.from_q4_k(q[e], d[e], neg_dmin[e], sc[e], mn[e], bias, dtype) for e in range(experts)]
    if kinds <= set(INT4_TYPES):
        codes = [[c.view(experts, rows, -1) for c in int4_codes(t, experts * rows, cols)] for t in stacked]
        q, scale, mins = (torch.cat(parts, dim=1) for parts in zip(*codes))        # [E, sum of rows, ...]
        return [int4_linear(q[e], scale[e].to(dtype), mins[e].to(dtype), bias) for e in range(experts)]
    if kinds == {"Q6_K"} and other == "int4" and _q6_k_direct(dtype):
        # what the float path below gives, quantised straight from the blocks in one C++ pass (csrc/q6_k.cpp)
        group = int4_group_size(cols) or QK
        blocks = [mapped_blocks(t) for t in stacked]
        b = None if bias is None else bias.detach().to(dtype)
        layers = []
        for e in range(experts):
            part = [x[e * rows:(e + 1) * rows] for x in blocks]
            joined = part[0] if len(part) == 1 else torch.cat(part)
            packed, params = kernels.q6_k_to_int4_tiles(joined.contiguous(), cols, group, dtype)
            layers.append(Int4Linear(packed, params, joined.shape[0], cols, group, b, None, dtype))
        return layers
    w = torch.cat([(q8_0_values(t, experts * rows, cols) if type_name(t) in INT8_TYPES
                    else float_tensor(t, (experts * rows, cols))).view(experts, rows, cols) for t in stacked], dim=1)
    if other == "int4":       # the groups qwenvl's own int4 uses: a group of 32 cost the head 1.34x (68 / 51 ms)
        group = int4_group_size(cols) or QK
        return [Int4Linear.from_weight(w[e].to(dtype), group, bias) for e in range(experts)]
    return [Int8Linear.from_int8(*quantize_int8(w[e], scale_dtype=dtype), bias) for e in range(experts)]


def _q6_k_values_in_cpp() -> bool:
    """Whether Q6_K's float values come from csrc/q6_k.cpp (where the kernels run) rather than gguf's numpy
    dequantisation (one thread; the reference, and the path where they do not): the same values to the bit."""
    return kernels.available()


def _q6_k_direct(dtype: torch.dtype) -> bool:
    """Whether Q6_K tensors go straight into int4 tiles (the kernels run, the tile layout, a bfloat16 or float32
    model); elsewhere gguf's dequantisation and Int4Linear.from_weight, the reference, give the same layer."""
    return _q6_k_values_in_cpp() and default_int4_layout() == LAYOUT_TILES and dtype in (torch.bfloat16,
                                                                                          torch.float32)


def int4_linear(q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor, bias: torch.Tensor | None) -> Int4Linear:
    """Int4Linear of w = q * scale + min per group of 32 (the layer's own form)."""
    return Int4Linear.from_scale_min(q, scale, mins, QK, bias)
