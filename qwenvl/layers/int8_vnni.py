"""int8 weight products through fbgemm's u8 x s8 GEMM, for CPUs with VNNI and without AMX.

Why: PyTorch's weight-only kernel `_weight_int8pack_mm` widens every int8 weight to float before it
multiplies. On a Zen 4 EPYC (AVX512-VNNI, no AMX) that is compute bound at ~17 GB/s of int8, barely faster
than the bf16 matrix-vector product, while fbgemm's integer GEMM (VNNI dot products on its own packed
layout) streams the same matrix at ~30 GB/s (bench/README.md has the per-kernel table). On CPUs with AMX
the weight-only kernel was already 2.7x bf16 and the bf16 GEMM is far faster than VNNI for prefill, so
those keep the plain int8 layout (`int8_layout()`).

An integer GEMM needs integer activations, and rounding them to 8 bits would change the math (one outlier
channel sets the step of the whole row). So each activation row is split exactly into passes of 7-bit
integers, x = m * (a0 + a1 / 126 + a2 / 126^2 ...) with |a_p| <= 63, each pass one more row of the same GEMM
(the weights are read once for all of them), and the outputs are recombined in float32. Each pass adds ~7
bits relative to the row's largest value; `ACTIVATION_PASSES` takes enough to be finer than the compute
dtype. With bf16's two: on a 1536-wide row with one channel 1000x the others, the product's error was
1.4e-3 of its largest output, against 5.3e-3 for the same product in bf16 arithmetic (3.2e-3 without the
outlier, 1.3e-4 for the passes). float32 models take four, within 2e-5 of float32 arithmetic on the
tiny test models' logits.
7 bits rather than 8 because without VNNI fbgemm sums pairs of u8 x s8 products in
int16 (vpmaddubsw), which 63 + 64 = 127 cannot overflow (2 * 127 * 127 < 2^15).
Each row is quantised on its own and the integer sums are exact, so a row's result does not depend on its
batch neighbours: batched == alone, bit for bit.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

# Passes per activation dtype: enough that the split is finer than the dtype the model computes in
# (bf16 keeps 8 significant bits, fp16 11, fp32 24; each pass adds ~7 bits relative to the row's maximum).
ACTIVATION_PASSES = {torch.bfloat16: 2, torch.float16: 3, torch.float32: 4}
_LEVEL = 63                     # |a_p| <= 63 around the zero point 64: unsigned 7-bit activations
_ZERO_POINT = 64
_RADIX = 2.0 * _LEVEL           # a pass's rounding residual is in [-0.5, 0.5]: times 126 it fits the next pass


LAYOUT_ENV = "QWENVL_INT8_LAYOUT"      # "plain", "fbgemm" or "tiles": override the choice (benchmarks compare)
LAYOUTS = ("plain", "fbgemm", "tiles")  # tiles: qwenvl's kernels (qwenvl/kernels), where they run


def forced_layout() -> str | None:
    """The layout QWENVL_INT8_LAYOUT forces for every int8 layer, or None when it is not set."""
    forced = os.environ.get(LAYOUT_ENV, "")
    if forced and forced not in LAYOUTS:
        raise ValueError(f"{LAYOUT_ENV}={forced!r}: use one of {', '.join(LAYOUTS)}")
    return forced or None


@functools.lru_cache(maxsize=None)
def int8_layout() -> str:
    """"fbgemm" where this CPU has VNNI and no AMX (and PyTorch has fbgemm), else "plain"; or the forced one."""
    forced = forced_layout()
    if forced:
        return forced
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return "plain"
    vnni = torch.cpu._is_vnni_supported()
    amx = torch.cpu._is_amx_tile_supported()
    return "fbgemm" if vnni and not amx else "plain"


# Below this many weights a layer keeps the plain layout even where fbgemm's is chosen: its decode product
# is too short for fbgemm's faster read to pay for the activation split and recombination around it
# (~14 small ops, ~100 us a product in place). Measured at Qwen2-VL-2B widths (bench/int8_layouts.py):
# a 1536 x 1536 product takes 0.16 ms plain, 0.19 ms in fbgemm's layout with its split, even alone.
FBGEMM_MIN_WEIGHTS = 8 << 20


def uses_fbgemm_layout(out_features: int, in_features: int) -> bool:
    """Whether a language-model int8 layer of this shape moves into fbgemm's layout: under `int8_layout()`
    "fbgemm", the layers of at least FBGEMM_MIN_WEIGHTS weights, or every layer when QWENVL_INT8_LAYOUT
    forces "fbgemm" (tests and benchmarks compare the layouts on small models)."""
    if int8_layout() != "fbgemm":
        return False
    return forced_layout() == "fbgemm" or out_features * in_features >= FBGEMM_MIN_WEIGHTS


def per_channel_quantized(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] + scales [out] -> the quantised tensor fbgemm's packer takes (a copy of qweight)."""
    with warnings.catch_warnings():
        # PyTorch marks quantised tensor creation as deprecated in favour of torchao, which has no CPU
        # integer GEMM of its own yet; torch 2.13 (pinned) still ships both the tensor and the kernel.
        warnings.simplefilter("ignore", UserWarning)
        return torch._make_per_channel_quantized_tensor(
            qweight.to(torch.int8), scales.double(), torch.zeros(qweight.shape[0], dtype=torch.long), 0)


class FbgemmInt8Weight:
    """One int8 weight [out, in] with a scale per output row, in fbgemm's packed layout (its only copy).

    Built from `per_channel_quantized(...)`, so that the caller can drop its plain matrix before the pack
    is made: two copies of one layer at a time, not three (the 151936-row head is 233 MB a copy)."""

    def __init__(self, quantized: torch.Tensor, scale_dtype: torch.dtype):
        self.out_features, self.in_features = quantized.shape
        self.scale_dtype = scale_dtype
        previous = torch.backends.quantized.engine
        try:
            torch.backends.quantized.engine = "fbgemm"
            self._packed = torch.ops.quantized.linear_prepack(quantized, None)
        finally:
            torch.backends.quantized.engine = previous

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(qweight int8 [out, in], scales [out]) as given (slow: tests and dequantisation only)."""
        q = torch.ops.quantized.linear_unpack(self._packed)[0]
        return q.int_repr(), q.q_per_channel_scales().to(self.scale_dtype)

    def nbytes(self) -> int:
        return self.out_features * self.in_features

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, in] float -> x @ (q * scale).T [R, out] in x's dtype."""
        rows, n_passes = x.shape[0], ACTIVATION_PASSES.get(x.dtype, 4)
        passes, row_scale = _split_rows(x, n_passes)
        y = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(passes, 1.0, _ZERO_POINT,
                                                                               self._packed)
        return _combine(y, rows, row_scale, x.dtype)


# At decode these run four times a layer per token, each step its own op: they are written for few ops.
def _split_rows(x: torch.Tensor, n_passes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, K] -> (passes [P*R, K] float32 whose values the GEMM rounds to integers in [-63, 63], the row
    scales m [R, 1]) with x = m * sum_p round(pass_p) / 126^p up to the last pass's rounding."""
    row_scale = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True, dtype=torch.float32)   # max |x|
    row_scale.div_(_LEVEL).clamp_(min=torch.finfo(torch.float32).tiny)   # an all-zero row: 0 / tiny, not 0 / 0
    out = torch.empty(n_passes, *x.shape, dtype=torch.float32)
    passes = out.unbind(0)
    torch.div(x, row_scale, out=passes[0])
    for prev, cur in zip(passes, passes[1:]):
        # the GEMM quantises with scale 1 (round half to even, as torch.round): this pass carries what
        # the previous one's rounding dropped
        torch.round(prev, out=cur)
        torch.sub(prev, cur, out=cur).mul_(_RADIX)
    return out.view(-1, x.shape[1]), row_scale


def _combine(y: torch.Tensor, rows: int, row_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """y [P*R, N] (each pass's product, pass-major) -> m * sum_p y_p / 126^p in `dtype`, Horner's way from
    the finest pass; the last multiply writes the result's dtype directly."""
    parts = y.view(-1, rows, y.shape[1]).unbind(0)
    acc = parts[-1]
    for part in reversed(parts[:-1]):
        acc = torch.add(part, acc, alpha=1.0 / _RADIX)
    if dtype == torch.float32:
        return acc.mul_(row_scale)
    return torch.mul(acc, row_scale, out=torch.empty(acc.shape, dtype=dtype))
