"""The kernels' arithmetic in plain PyTorch: what tests compare the compiled kernels against.

int4 decode product, per row r of x [R, K] and output n, groups g of G inputs:
  1. activations, each row and group on its own, in P passes (quantize_activations; P = 1 for bfloat16,
     3 for float32, kernels.ACTIVATION_PASSES): amax = max|x|, d_0 = amax / 127,
     v = x * (127 / amax) (0 for an all-zero group); pass p: a_p = round_half_even(v) in -127..127,
     xs_p = d_p * sum(a_p), then v = (v - a_p) * 254 and d_{p+1} = d_p / 254, all in float32;
  2. integer dot products per group and pass: I[r, p, n, g] = sum_{k in g} q[n, k] * a_p[r, k], exact in
     int32 (|I| <= 15 * 127 * G);
  3. y[r, n] = sum_p sum_g s[n, g] * d_p[r, g] * I[r, p, n, g] + m[n, g] * xs_p[r, g]   (float32 in the kernel).
The scales and mins are the layout's (int4_layout.unpack_params): Q4_K's super-block form gives s = d * sc and
m = -dmin * m, exact in float32 in the kernel as here, so it is the float32 form's arithmetic to the bit.
Steps 1 and 2 are bit-exact in the kernel. Step 3 there runs per pass and group as
acc = fma(m, xs, fma(s * d, I, acc)), three roundings of float32 per group, then the passes are added from
the finest, so against this float64 sum |y_kernel - y| <= (3 * groups + P) * 2^-24 * sum (|s d I| + |m xs|)
(to first order; `int4_matmul` returns that bound with the value). A bfloat16 output is then the float32
result rounded to nearest even.

int8 decode product (int8_layout.py), w[n, k] = q[n, k] * scale[n], blocks b of 32 inputs (K padded with zeros):
  1. activations as above with block 32;
  2. I[r, p, n, b] = sum_{k in b} q[n, k] * a_p[r, k], exact in int32 (|I| <= 32 * 127 * 127);
  3. y[r, n] = scale[n] * sum_p sum_b d_p[r, b] * I[r, p, n, b] + bias[n].
The kernel runs step 3 per pass as acc = fma(I, d, acc), one rounding per block, adds the passes from the
finest (P - 1 roundings), multiplies by the scale and adds the bias (2 more):
|y_kernel - y| <= (blocks + P + 2) * 2^-24 * (|scale| * sum |d I| + |bias|).

bf16 decode product over nn.Linear's weight: y[r, n] = sum_k w[n, k] x[r, k] + bias[n], every product exact
in float32 (8 x 8 significant bits). The kernel sums along K in float32 lanes (a lane takes at most one
addition per 8 inputs, AVX-512 BF16's two products per 32 inputs included), then across at most 16 lanes
(4 levels) and adds the bias: |y_kernel - y| <= (K / 8 + 6) * 2^-24 * (sum |w x| + |bias|), plus what
vdpbf16ps's flushing of subnormal inputs drops (below 2^-126 a product: nothing at model scales).
"""

from __future__ import annotations

import torch

from . import int4_layout, int8_layout


def quantize_activations(x: torch.Tensor, block: int, passes: int = 1
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [R, K] -> (a int8 [R P, K], d float32 [R P, K/block], xs float32 [R P, K/block]), row r's pass p
    at r P + p."""
    rows, k = x.shape
    xb = x.float().view(rows, k // block, block)
    amax = xb.abs().amax(dim=2)
    # a true division (`127.0 / amax` would be amax.reciprocal() * 127 in PyTorch, rounded differently)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0).div_(amax), torch.zeros_like(amax))
    v = xb * inv[..., None]
    d = amax / 127.0
    a_passes, d_passes, xs_passes = [], [], []
    for _ in range(passes):
        a = torch.round(v)
        a_passes.append(a.to(torch.int8).view(rows, k))
        d_passes.append(d)
        xs_passes.append(d * a.sum(dim=2))
        v = (v - a) * 254.0
        d = d / 254.0
    return (torch.stack(a_passes, 1).view(rows * passes, k), torch.stack(d_passes, 1).view(rows * passes, -1),
            torch.stack(xs_passes, 1).view(rows * passes, -1))


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, params: torch.Tensor, group_size: int,
                out_features: int, passes: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(y float64 [R, N], the bound on the kernel's float32 error [R, N]) for x @ W.T, W in the tile layout."""
    rows, k = x.shape
    a, d, xs = quantize_activations(x, group_size, passes)
    q = int4_layout.unpack(packed, k)[:out_features]
    scales, mins = (p[:out_features].double() for p in int4_layout.unpack_params(params))
    groups = k // group_size
    # exact: every partial sum is an integer far below 2^53
    isum = torch.einsum("rgk,ngk->rng", a.double().view(-1, groups, group_size),
                        q.double().view(-1, groups, group_size))
    scaled = scales[None] * d.double()[:, None] * isum                     # [R P, N, G]
    shifted = mins[None] * xs.double()[:, None]                           # [R P, N, G]
    y = (scaled + shifted).sum(dim=2).view(rows, passes, -1).sum(dim=1)
    terms = (scaled.abs() + shifted.abs()).sum(dim=2).view(rows, passes, -1).sum(dim=1)
    return y, (3 * groups + passes) * 2.0 ** -24 * terms


def int8_matmul(x: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                out_features: int, passes: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(y float64 [R, N], the bound on the kernel's float32 error [R, N]) for x @ (q * scale).T + bias."""
    rows, k = x.shape
    k_pad = tiles.shape[1] * 4
    xp = torch.nn.functional.pad(x, (0, k_pad - k))
    a, d, _ = quantize_activations(xp, int8_layout.BLOCK_K, passes)
    q = int8_layout.unpack(tiles, out_features, k_pad)
    blocks = k_pad // int8_layout.BLOCK_K
    isum = torch.einsum("rbk,nbk->rnb", a.double().view(-1, blocks, int8_layout.BLOCK_K),
                        q.double().view(-1, blocks, int8_layout.BLOCK_K))               # exact
    scaled = d.double()[:, None] * isum                                               # [R P, N, B]
    s = scales[:out_features].double()
    b = torch.zeros(out_features, dtype=torch.float64) if bias is None else bias.double()
    y = scaled.sum(dim=2).view(rows, passes, -1).sum(dim=1) * s + b
    terms = scaled.abs().sum(dim=2).view(rows, passes, -1).sum(dim=1) * s.abs() + b.abs()
    return y, (blocks + passes + 2) * 2.0 ** -24 * terms


def bf16_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(y float64 [R, N], the bound on the kernel's float32 error before its bfloat16 rounding)."""
    b = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.double()
    y = x.double() @ weight.double().T + b
    terms = x.double().abs() @ weight.double().abs().T + b.abs()
    return y, (x.shape[1] / 8 + 6) * 2.0 ** -24 * terms


# ---- the element-wise decode ops (csrc/decode_ops_kernel.hpp). U = 2^-24, the float32 unit roundoff; a
# bfloat16 result is the float32 one rounded to nearest even, so it may land on the other bfloat16 neighbour
# of the exact value when that lies within the float32 error of a rounding boundary: one bf16 step, at most
# 2^-7 of the value (2^-8 for the final rounding itself).

U = 2.0 ** -24


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s, y float64, bound) for s = x + delta (PyTorch's add, rounded to the dtype: the kernel's is equal
    bit for bit) and y = weight * round_dtype(s / sqrt(mean(s^2) + eps)).

    The kernel sums the squares in float32 lanes (at most D / 8 + 1 additions a lane, 4 levels across lanes,
    every term positive), divides, adds eps, takes sqrt and 1 / sqrt: its 1 / rms is within
    e = (D / 8 + 10) U of the exact one, relatively. float32: y within (e + 3 U) |y|. bfloat16: the normed
    value may round to the other neighbour (2^-7) and y = weight * normed rounds once more (2^-8)."""
    s = x if delta is None else x + delta
    sd = s.double()
    normed = sd * torch.rsqrt(sd.pow(2).mean(-1, keepdim=True) + eps)
    if s.dtype == torch.bfloat16:
        y = weight.double() * normed.to(torch.bfloat16).double()
        bound = (2.0 ** -7 + 2.0 ** -8) * y.abs()
    else:
        y = weight.double() * normed
        bound = ((s.shape[-1] / 8 + 13) * U) * y.abs()
    return s, y, bound


def rotary(x: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [R, W] with the first `heads` heads rotated (cos/sin [R, >= head_dim / 2], the first halves):
    (x1 c - x2 s, x2 c + x1 s) in float32, each product and sum rounded once, then to x's dtype. The kernel
    runs exactly these operations: equal bit for bit."""
    half = head_dim // 2
    out = x.clone()
    h = x[:, : heads * head_dim].float().view(x.shape[0], heads, head_dim)
    c, s = cos[:, None, :half], sin[:, None, :half]
    x1, x2 = h[..., :half], h[..., half:]
    rotated = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    out[:, : heads * head_dim] = rotated.reshape(x.shape[0], -1).to(x.dtype)
    return out


def silu_mul(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y float64, bound) for y = round_dtype(silu(gate)) * up, gate_up [R, 2I]. The kernel's exp is within
    3 U (Cody-Waite reduction, a degree-6 polynomial), then 1 + e, the division and the product round once
    each: float32 within 6 U |y|; bfloat16 one step more (silu's rounding to bf16, 2^-7) and the final
    rounding (2^-8). Below g ~ -88.4 the kernel's exp(-g) saturates at ~2^127.5 where the true one grows on,
    so its silu is g 2^-127.5 instead of ~0: an absolute |g u| 2^-126 at most."""
    half = gate_up.shape[-1] // 2
    g, u = gate_up[:, :half].double(), gate_up[:, half:].double()
    silu = g * torch.sigmoid(g)
    if gate_up.dtype == torch.bfloat16:
        y = silu.to(torch.bfloat16).double() * u
        return y, (2.0 ** -7 + 2.0 ** -8) * y.abs() + (g * u).abs() * 2.0 ** -126
    y = silu * u
    return y, 6 * U * y.abs() + (g * u).abs() * 2.0 ** -126


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: list[list[int]],
                           context_lens: list[int], block_size: int, scale: float
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out float64 [B, Hq, Dh], bound) for one query per sequence over its keys in the pool (after the
    step's k/v are written), query head h on kv head h // (Hq / Hkv).

    The kernel's score q . k is a float32 fused multiply-add chain per lane (Dh / 8 a lane) plus 4 levels
    across lanes, times the scale: within e_t = (Dh / 8 + 6) U scale sum|q k| of the exact one. A softmax
    weight is exp(s_t - max) / sum: within 2 max_t e_t (its score and the max's) plus (L / 8 + 10) U
    relatively (exp within 3 U, the sum's additions, the division). The weighted sum over L keys adds
    (L + 1) U sum p |v|. So |out - exact| <= (2 max e_t + (2 L + 20) U) sum_t p_t |v_t|, and a bfloat16
    result one rounding more (2^-8 |out|)."""
    B, Hq, Dh = q.shape
    Hkv = k_pool.shape[1]
    group = Hq // Hkv
    out = torch.empty(B, Hq, Dh, dtype=torch.float64)
    bound = torch.empty(B, Hq, Dh, dtype=torch.float64)
    for b in range(B):
        L = context_lens[b]
        t = torch.arange(L)
        slots = torch.tensor(block_tables[b], dtype=torch.long)[t // block_size] * block_size + t % block_size
        k = k_pool[slots].double().repeat_interleave(group, dim=1).transpose(0, 1)      # [Hq, L, Dh]
        v = v_pool[slots].double().repeat_interleave(group, dim=1).transpose(0, 1)
        qb = q[b].double()[:, None, :]                                                    # [Hq, 1, Dh]
        p = torch.softmax((qb * k).sum(-1) * scale, dim=-1)                              # [Hq, L]
        out[b] = (p[..., None] * v).sum(1)
        e_t = (Dh / 8 + 6) * U * scale * (qb.abs() * k.abs()).sum(-1)                   # [Hq, L]
        weighted = (p[..., None] * v.abs()).sum(1)                                       # [Hq, Dh]
        bound[b] = (2 * e_t.amax(-1, keepdim=True) + (2 * L + 20) * U) * weighted
    if q.dtype == torch.bfloat16:
        bound += 2.0 ** -8 * out.abs()
    return out, bound
