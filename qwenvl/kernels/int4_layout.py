"""The int4 tile layout the kernels read, packed and unpacked in plain PyTorch.

A weight W [N, K] is w[n, k] = q[n, k] * scale[n, g] + min[n, g], q in 0..15, g = k // G, for any group size
G that is a multiple of 32 dividing K (Int4Linear offers 32, 64, 128 and 256). This one form holds both
conventions that ship: AWQ/GPTQ's integer zero points (min = -zero * scale) and llama.cpp's Q4_K
sub-blocks of 32 (scale = d * sc, min = -dmin * m); Q4_0 is scale = d, min = -8 d.

  packed  uint8 [N_pad, K / 2]          N_pad = N rounded up to 16; as bytes it is [N_pad/16][K/32][4][64]:
          a tile of 16 rows holds its K inputs in blocks of 32, each 4 chunks of 64 bytes; chunk c holds
          inputs 8c..8c+7 of the block, row n's 4 bytes at 4n, byte j with input 8c+j in its low nibble and
          8c+4+j in its high one (csrc/int4_kernel.hpp says why).
  params  float32 or bfloat16 [N_pad/16, K/G, 2, 16]: per tile and group, the 16 rows' scales, then their
          mins. bfloat16 where every value is exactly a bfloat16 (qwenvl's own quantiser, 4.25 bits a weight at
          G = 128), else float32 (AWQ/GPTQ's fp16 scales and their mins, Q4_K's products: no second rounding).
          Or, for llama.cpp's Q4_K (G = 32, K a multiple of 256), its own super-blocks, uint8
          [N_pad/16, K/256, 320]: per tile and 256 inputs the 16 rows' d (fp16, 32 bytes), their -dmin (fp16,
          32 bytes), then sc [8 groups][16 rows] and m [8][16] (uint8, 6-bit values); the kernel forms
          scale = d * sc and min = -dmin * m in float32, where both products are exact (11 x 6 significant
          bits), so this holds the float32 form's values in 4.625 bits a weight instead of 6.
  Padded rows have q = 0, scale = min = 0.

Why this layout. A decode product is a read of the whole matrix per step, so the kernel has to stay ahead
of memory with the fewest instructions per byte, for 1 row and for a batch of up to 16:
  - 16 rows x 4 inputs per 64-byte chunk is exactly one vpdpbusd's unsigned operand (16 int32 lanes, 4 bytes
    each) against 4 activation bytes broadcast, so 16 outputs advance together with no horizontal sums
    (ggml's Q4_K x Q8_K dot product reduces each row's vector horizontally at the end of the row instead);
    the same bytes are two 8-lane halves for the AVX2 build, which gives the identical result.
  - input 8c+j in the low nibble and 8c+4+j in the high one: one load, an AND and a shift-AND give the two
    vectors of consecutive inputs; the nibbles are the unsigned operand, the int8 activations the signed
    one, and the min folds in once per group from the activations' block sum (no zero point per weight).
  - every row of a batch reuses a weight vector while it is in a register (8 rows a pass with AVX-512, 4
    with AVX2); more rows take another pass over the tile from L1/L2, not from memory.
  - the group parameters are a second stream, 8 or 4 bytes per 16 x 128 weights: the scales in bfloat16
    where that is exact, float32 where bfloat16 would round the checkpoint's own.
Measured (Xeon with AVX-512 VNNI, shared 2-core VM, one thread, a 1024 x 1536 matrix hot in L2, so the
kernel's arithmetic rather than memory; same process, medians of 5 alternating rounds, GB/s of weights):
    rows          1      4      8     16
    AVX-512    50.6   25.7   14.9    7.5
    AVX2       33.3    9.9    5.0    2.4
Two cores' arithmetic for one row (~100 GB/s) is ~3x the 28-35 GB/s copy bandwidth bench/README.md records
for this machine when quiet, so one row is bound by memory; eight rows (~30 GB/s on two cores) are about
at memory's pace, which is what lets a decode step of 8 sequences cost little more than a step of one.
bench/int4_kernels.py times cold matrices, with the copy bandwidth and PyTorch's kernels beside them.
Not measured: other interleavings (e.g. 8-row tiles, or ggml's row-major blocks) on this machine.
(Those are the kernel before issue 36's pass; csrc/int4_kernel.hpp's header has what bounds it now, and the
same 16 x 4-byte rows are AMX's B operand, which csrc/int4_amx.hpp uses for 8 to 16 rows.)
"""

from __future__ import annotations

import torch

from qwenvl.kernels import weight_memory

TILE_N = 16         # output rows per tile: a 512-bit vector of int32 sums
BLOCK_K = 32        # inputs per 256-byte block of a tile
_CHUNK_ROWS = 4096  # pack this many rows at a time (a 151936-row head's int64 temporaries stay small)


def padded_rows(n: int) -> int:
    return -(-n // TILE_N) * TILE_N


def check_group_size(in_features: int, group_size: int) -> None:
    if group_size <= 0 or group_size % BLOCK_K or in_features % group_size:
        raise ValueError(f"int4 tile layout: group size {group_size} must be a multiple of {BLOCK_K} dividing "
                         f"in_features {in_features}")


def pack(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
         param_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """q uint8 0..15 [N, K], scales / mins [N, K/G] -> (packed [N_pad, K/2], params [N_pad/16, K/G, 2, 16])."""
    n, k = q.shape
    check_group_size(k, group_size)
    if scales.shape != (n, k // group_size) or mins.shape != scales.shape:
        raise ValueError(f"int4 tile layout: scales {tuple(scales.shape)} / mins {tuple(mins.shape)} do not fit "
                         f"q {tuple(q.shape)} in groups of {group_size}")
    n_pad = padded_rows(n)
    packed = pack_codes(q)
    params = torch.zeros(n_pad, 2, k // group_size, dtype=param_dtype)
    params[:n, 0] = scales.to(param_dtype)
    params[:n, 1] = mins.to(param_dtype)
    # [N_pad, 2, G] -> [tiles, 16, 2, G] -> [tiles, G, 2, 16]
    params = params.view(n_pad // TILE_N, TILE_N, 2, -1).permute(0, 3, 2, 1)
    return packed, weight_memory.empty(params.shape, param_dtype).copy_(params)


SUPER_K = 256          # inputs per Q4_K super-block
SUPER_GROUPS = SUPER_K // BLOCK_K
SUPER_BYTES = 320      # per tile and super-block: d, -dmin (16 fp16 each), sc, m (8 x 16 uint8 each)


def pack_super_blocks(d: torch.Tensor, neg_dmin: torch.Tensor, sc: torch.Tensor, m: torch.Tensor
                      ) -> torch.Tensor:
    """Q4_K's parameters -> super-block params uint8 [N_pad/16, K/256, 320]: d, neg_dmin float16 [N, K/256]
    (exactly: they come from the file's fp16), sc, m uint8 [N, K/32] 0..63. Padded rows get zeros."""
    n, supers = d.shape
    if neg_dmin.shape != d.shape or sc.shape != (n, supers * SUPER_GROUPS) or m.shape != sc.shape:
        raise ValueError(f"int4 super-blocks: d {tuple(d.shape)}, -dmin {tuple(neg_dmin.shape)}, sc "
                         f"{tuple(sc.shape)}, m {tuple(m.shape)} do not fit together")
    tiles = padded_rows(n) // TILE_N

    def per_tile(v: torch.Tensor, dtype: torch.dtype, width: int) -> torch.Tensor:
        rows = torch.zeros(tiles * TILE_N, v.shape[1], dtype=dtype)
        rows[:n] = v
        # [tiles, 16, S, width] -> [tiles, S, width, 16] as bytes
        t = rows.view(tiles, TILE_N, supers, width).permute(0, 2, 3, 1).contiguous()
        return t.view(torch.uint8).view(tiles, supers, -1)

    params = torch.cat([per_tile(d, torch.float16, 1), per_tile(neg_dmin, torch.float16, 1),
                        per_tile(sc, torch.uint8, SUPER_GROUPS), per_tile(m, torch.uint8, SUPER_GROUPS)], dim=2)
    return weight_memory.empty(params.shape, torch.uint8).copy_(params)


def _super_block_values(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """super-block bytes [..., S, 320] with the 16 rows last -> (scales, mins) float32 [..., S, 8, 16]:
    d * sc and -dmin * m, exact in float32 as in the kernel."""
    lead = p.shape[:-1]
    d = p[..., 0:32].contiguous().view(torch.float16).float().view(*lead, 1, TILE_N)
    nd = p[..., 32:64].contiguous().view(torch.float16).float().view(*lead, 1, TILE_N)
    sc = p[..., 64:192].float().view(*lead, SUPER_GROUPS, TILE_N)
    m = p[..., 192:320].float().view(*lead, SUPER_GROUPS, TILE_N)
    return d * sc, nd * m


def pack_codes(q: torch.Tensor) -> torch.Tensor:
    """q uint8 0..15 [N, K] -> packed [N_pad, K/2] in tile order (padded rows 0)."""
    n, k = q.shape
    n_pad = padded_rows(n)
    packed = weight_memory.empty((n_pad, k // 2), torch.uint8)        # on 2 MiB pages where it can be
    for r0 in range(0, n_pad, _CHUNK_ROWS):
        r1 = min(r0 + _CHUNK_ROWS, n_pad)
        rows = torch.zeros(r1 - r0, k, dtype=torch.uint8)
        rows[: max(0, min(r1, n) - r0)] = q[r0:min(r1, n)]
        packed[r0:r1] = _pack_tiles(rows)
    return packed


def _pack_tiles(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [16 T, K] -> [16 T, K/2] bytes in tile order."""
    n, k = q.shape
    t = q.view(n // TILE_N, TILE_N, k // BLOCK_K, 4, 2, 4)         # tile, row, block, chunk, nibble, byte
    t = t.permute(0, 2, 3, 1, 5, 4)                                   # tile, block, chunk, row, byte, nibble
    return (t[..., 0] | (t[..., 1] << 4)).reshape(n, k // 2)


def unpack(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """packed [16 T, K/2] (whole tiles) -> q uint8 [16 T, K]."""
    n, k = packed.shape[0], in_features
    b = packed.view(n // TILE_N, k // BLOCK_K, 4, TILE_N, 4)          # tile, block, chunk, row, byte
    q = torch.stack([b & 0x0F, b >> 4], dim=-1)                       # ..., byte, nibble
    return q.permute(0, 3, 1, 2, 5, 4).reshape(n, k)                  # tile, row, block, chunk, nibble, byte


def unpack_params(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """params [T, K/G, 2, 16] -> (scales, mins), each [16 T, K/G] in params' dtype (float32 for super-blocks)."""
    if params.dtype == torch.uint8:
        t = params.shape[0]
        scales, mins = _super_block_values(params)                    # [T, S, 8, 16]
        return tuple(v.permute(0, 3, 1, 2).reshape(t * TILE_N, -1) for v in (scales, mins))
    t, g = params.shape[:2]
    rows = params.permute(0, 3, 2, 1).reshape(t * TILE_N, 2, g)
    return rows[:, 0], rows[:, 1]


def gather_rows(packed: torch.Tensor, params: torch.Tensor, in_features: int, ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows `ids` (1-D) straight from the layout: (q uint8 [R, K], scales [R, K/G], mins [R, K/G])."""
    k = in_features
    tiles = packed.view(-1, k // BLOCK_K, 4, TILE_N, 4)
    tile, lane = ids // TILE_N, ids % TILE_N
    b = tiles[tile, :, :, lane]                                       # [R, block, chunk, byte]
    q = torch.stack([b & 0x0F, b >> 4], dim=-2).reshape(ids.shape[0], k)   # [R, block, chunk, nibble, byte]
    if params.dtype == torch.uint8:
        scales, mins = _super_block_values(params[tile])                # [R, S, 8, 16]
        r = torch.arange(ids.shape[0])
        return q, scales[r, :, :, lane].reshape(len(r), -1), mins[r, :, :, lane].reshape(len(r), -1)
    p = params[tile, :, :, lane]                                      # [R, K/G, 2]
    return q, p[..., 0], p[..., 1]


def dequantize(packed: torch.Tensor, params: torch.Tensor, in_features: int, group_size: int,
               dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """W [16 T, K] in `dtype` (into `out` when given) from whole tiles: q * scale + min, computed in float32."""
    q = unpack(packed, in_features)
    scales, mins = unpack_params(params)
    return _dequantized(q, scales, mins, group_size, dtype, out)


def dequantize_rows(packed: torch.Tensor, params: torch.Tensor, in_features: int, group_size: int,
                    ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _dequantized(*gather_rows(packed, params, in_features, ids), group_size, dtype, None)


def _dequantized(q, scales, mins, group_size, dtype, out):
    n, k = q.shape
    w = q.view(n, k // group_size, group_size).float()
    w = w.mul_(scales.float()[..., None]).add_(mins.float()[..., None]).view(n, k)
    if out is None:
        return w.to(dtype)
    return out.copy_(w)
