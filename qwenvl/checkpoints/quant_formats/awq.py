"""AutoAWQ GEMM layout (4 bit, group-wise, asymmetric), facts checked against AutoAWQ 0.2.9's own source
(awq/modules/linear/gemm.py WQLinear_GEMM.from_linear, awq/utils/packing_utils.py AWQ_ORDER); transformers
5.x delegates AWQ to gptqmodel and holds no packing code of its own:
  qweight int32 [in, out/8]   8 nibbles per int32 along the OUTPUT dim, interleaved: nibble j (bits 4j)
                              holds output column 8c + AWQ_ORDER[j], AWQ_ORDER = [0,2,4,6,1,3,5,7]
  qzeros  int32 [in/g, out/8] same packing
  scales  fp16  [in/g, out]
  w[o, i] = (q[i, o] - z[i // g, o]) * s[i // g, o]
"""
from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)         # nibble j of a word holds column AWQ_ORDER[j] of its 8


def pack_awq(q: torch.Tensor) -> torch.Tensor:
    """q: integers 0..15, [rows, out] -> int32 [rows, out/8] in AWQ's interleaved nibble order."""
    rows, out = q.shape
    q = q.to(torch.int64).reshape(rows, out // 8, 8)                 # [rows, out/8, 8]
    packed = torch.zeros(rows, out // 8, dtype=torch.int64)
    for j, col in enumerate(AWQ_ORDER):
        packed |= q[..., col] << (4 * j)
    return _to_int32(packed)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, out/8] -> uint8 integers 0..15 [rows, out] (inverse of pack_awq), vectorised (a 7B layer's
    68M values in well under a second). AWQ_ORDER puts the even columns of a word in nibbles 0-3 and the odd
    ones in nibbles 4-7, so nibbles viewed as [2, 4] and transposed are in column order. The arithmetic
    shift of negative words is harmless under the mask."""
    rows, n = packed.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = ((packed.to(torch.int32)[..., None] >> shifts) & 0xF).to(torch.uint8)  # [rows, out/8, 8] by nibble
    return nibbles.view(rows, n, 2, 4).transpose(2, 3).reshape(rows, n * 8)


def dequantize_awq(qweight, qzeros, scales, group_size: int) -> torch.Tensor:
    """The float weight [out, in] that an AWQ linear represents."""
    q = unpack_awq(qweight).float()                                   # [in, out]
    z = unpack_awq(qzeros).float().repeat_interleave(group_size, 0)   # [in, out]
    s = scales.float().repeat_interleave(group_size, 0)               # [in, out]
    return ((q - z) * s).t().contiguous()


def to_int4_linear_args(qweight, qzeros, scales, group_size: int) -> dict:
    """Arguments for Int4Linear.from_int4: qweight [out, in], scales/zeros [out, in/g]."""
    return dict(qweight=unpack_awq(qweight).t().contiguous(),
                scales=scales.t().contiguous(),
                zeros=unpack_awq(qzeros).t().to(scales.dtype).contiguous(),
                group_size=group_size, in_perm=None)


def _to_int32(x: torch.Tensor) -> torch.Tensor:
    # values are 0..2^32-1; reinterpret the upper half as negative int32, as the format stores them
    return torch.where(x >= 2 ** 31, x - 2 ** 32, x).to(torch.int32)
