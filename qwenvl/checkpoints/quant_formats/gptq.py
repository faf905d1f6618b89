"""GPTQ layout (AutoGPTQ / optimum / GPTQModel), 4 or 8 bit, facts checked against AutoGPTQ 0.7.1's
source (nn_modules/qlinear/qlinear_cuda_old.py: pack() and the torch dequantisation path):
  qweight int32 [in*bits/32, out]      packed along the INPUT dim, sequential: row r, field j (bits
                                       bits*j) holds input r*(32/bits) + j
  qzeros  int32 [groups, out*bits/32]  packed along the output dim, sequential
  scales  fp16  [groups, out]
  g_idx   int32 [in]                   group of each input column (a permutation with desc_act)
  w[o, i] = (q[i, o] - z[g_idx[i], o]) * s[g_idx[i], o]
checkpoint_format "gptq" (v1, the default) stores zero - 1 (a historical off-by-one); "gptq_v2" stores
the zero itself. AutoGPTQ reads v1 zeros as (stored + 1) & (2^bits - 1), so a zero point of 0 (stored as
all ones) comes back as 0; the unpacker does the same. Symmetric checkpoints (Qwen's) have zero 2^(bits-1).
"""
from __future__ import annotations

import torch

from .awq import _to_int32


def _zero_offset(checkpoint_format: str) -> int:
    return 1 if checkpoint_format in ("gptq", "", None) else 0


def pack_along(q: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Integers 0..2^bits-1 -> int32 with 32/bits fields per word along `dim` (0 or 1), sequential."""
    per = 32 // bits
    q = q.to(torch.int64)
    if dim == 0:
        q = q.t()
    rows, n = q.shape
    q = q.reshape(rows, n // per, per)                               # [rows, n/per, per]
    packed = torch.zeros(rows, n // per, dtype=torch.int64)
    for j in range(per):
        packed |= q[..., j] << (bits * j)
    packed = _to_int32(packed)
    return packed.t().contiguous() if dim == 0 else packed


def unpack_along(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> uint8 integers, fields unpacked along `dim` (inverse of pack_along); vectorised over the
    fields, and the arithmetic shift of negative words is harmless under the mask."""
    per, mask = 32 // bits, (1 << bits) - 1
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    p = packed.to(torch.int32)
    if dim == 0:                                                         # [in/per, out] -> [in, out]
        q = (p[:, None, :] >> shifts[None, :, None]) & mask              # [in/per, per, out]
        return q.to(torch.uint8).reshape(p.shape[0] * per, p.shape[1])
    q = (p[..., None] >> shifts) & mask                                  # [rows, n, per]
    return q.to(torch.uint8).reshape(p.shape[0], p.shape[1] * per)


def pack_gptq(q, zeros, bits: int, checkpoint_format: str = "gptq"):
    """q [in, out], zeros [groups, out] (real zero points) -> (qweight, qzeros) as stored."""
    stored = zeros.to(torch.int64) - _zero_offset(checkpoint_format)
    stored = stored & ((1 << bits) - 1)   # v1 stores zero-1 modulo 2^bits (a zero of 0 wraps)
    return pack_along(q, bits, 0), pack_along(stored, bits, 1)


def unpack_gptq(qweight, qzeros, bits: int, checkpoint_format: str = "gptq"):
    """-> (q [in, out] uint8, zeros [groups, out] int64 real zero points)."""
    q = unpack_along(qweight, bits, 0)
    z = unpack_along(qzeros, bits, 1).to(torch.int64) + _zero_offset(checkpoint_format)
    return q, z & ((1 << bits) - 1)


def dequantize_gptq(qweight, qzeros, scales, g_idx, bits: int, checkpoint_format: str = "gptq"):
    """The float weight [out, in] that a GPTQ linear represents."""
    q, z = unpack_gptq(qweight, qzeros, bits, checkpoint_format)
    g = g_idx.long()
    w = (q.float() - z[g].float()) * scales.float()[g]                 # [in, out]
    return w.t().contiguous()


def to_int4_linear_args(qweight, qzeros, scales, g_idx, group_size: int, checkpoint_format: str = "gptq"):
    """Arguments for Int4Linear.from_int4 (4 bit). With desc_act the input columns are visited in group
    order (in_perm = stable argsort of g_idx), so every run of `group_size` kernel columns is one group."""
    q, z = unpack_gptq(qweight, qzeros, 4, checkpoint_format)          # [in, out], [groups, out]
    g = g_idx.long()
    in_perm = None
    if not torch.equal(g, torch.arange(g.numel()) // group_size):
        in_perm = torch.argsort(g, stable=True)
        q = q[in_perm]
    return dict(qweight=q.t().contiguous(), scales=scales.t().contiguous(),
                zeros=z.t().to(scales.dtype).contiguous(), group_size=group_size, in_perm=in_perm)
