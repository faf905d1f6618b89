"""The kernels' arithmetic in plain PyTorch: what tests compare the compiled kernels against.

int4 decode product, per row r of x [R, K] and output n, groups g of G inputs:
  1. activations, each row and group on its own (quantize_activations): amax = max|x|, d = amax / 127,
     a = round_half_even(x * (127 / amax)) in -127..127 (0 for an all-zero group), xs = d * sum(a);
  2. integer dot products per group: I[r, n, g] = sum_{k in g} q[n, k] * a[r, k], exact in int32
     (|I| <= 15 * 127 * G);
  3. y[r, n] = sum_g s[n, g] * d[r, g] * I[r, n, g] + m[n, g] * xs[r, g]   (float32 in the kernel).
Steps 1 and 2 are bit-exact in the kernel. Step 3 there runs per group as
acc = fma(m, xs, fma(s * d, I, acc)), three roundings of float32 per group, so against this float64 sum
|y_kernel - y| <= (3 * groups + 1) * 2^-24 * sum_g (|s d I| + |m xs|) (to first order; `int4_matmul`
returns that bound with the value). A bfloat16 output is then the float32 result rounded to nearest even.
"""

from __future__ import annotations

import torch

from . import int4_layout


def quantize_activations(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [R, K] -> (a int8 [R, K], d float32 [R, K/block], xs float32 [R, K/block])."""
    rows, k = x.shape
    xb = x.float().view(rows, k // block, block)
    amax = xb.abs().amax(dim=2)
    # a true division (`127.0 / amax` would be amax.reciprocal() * 127 in PyTorch, rounded differently)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0).div_(amax), torch.zeros_like(amax))
    a = torch.round(xb * inv[..., None])
    d = amax / 127.0
    xs = d * a.sum(dim=2)
    return a.to(torch.int8).view(rows, k), d, xs


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, params: torch.Tensor, group_size: int,
                out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(y float64 [R, N], the bound on the kernel's float32 error [R, N]) for x @ W.T, W in the tile layout."""
    k = x.shape[1]
    a, d, xs = quantize_activations(x, group_size)
    q = int4_layout.unpack(packed, k)[:out_features]
    scales, mins = (p[:out_features].double() for p in int4_layout.unpack_params(params))
    groups = k // group_size
    # exact: every partial sum is an integer far below 2^53
    isum = torch.einsum("rgk,ngk->rng", a.double().view(-1, groups, group_size),
                        q.double().view(-1, groups, group_size))
    scaled = scales[None] * d.double()[:, None] * isum                     # [R, N, G]
    shifted = mins[None] * xs.double()[:, None]                           # [R, N, G]
    y = (scaled + shifted).sum(dim=2)
    bound = (3 * groups + 1) * 2.0 ** -24 * (scaled.abs() + shifted.abs()).sum(dim=2)
    return y, bound
