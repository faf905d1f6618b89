"""The int8 tile layout the kernels read (csrc/int8_kernel.hpp), packed and unpacked in plain PyTorch.

A weight W [N, K] is w[n, k] = q[n, k] * scale[n], q int8 in -127..127 (Int8Linear's form).

  tiles   int8 [N_pad/16, K_pad/4, 16, 4]    N_pad = N rounded up to 16, K_pad = K rounded up to 32:
          tile t holds rows 16t..16t+15; its [k4, n, j] byte is q[16t + n, 4 k4 + j]. So 64 consecutive bytes
          are 4 consecutive inputs of each of the tile's 16 rows: vpdpbusd's operand (16 lanes x 4 bytes).
          Padded rows and inputs hold 0. The bytes are the weights themselves: N_pad x K_pad, one copy.
  scales  float32 [N_pad] (padded rows 0), the kernel's copy of the layer's scales.
The tiles are allocated on 2 MiB pages where the platform allows (weight_memory.py says why).
"""

from __future__ import annotations

import torch

from qwenvl.kernels import weight_memory

TILE_N = 16         # output rows per tile: a 512-bit vector of int32 sums
BLOCK_K = 32        # inputs per activation block (the row length is padded to a multiple)
_CHUNK_ROWS = 4096  # pack this many rows at a time (a 151936-row head's temporaries stay small)


def padded_rows(n: int) -> int:
    return -(-n // TILE_N) * TILE_N


def padded_inputs(k: int) -> int:
    return -(-k // BLOCK_K) * BLOCK_K


def pack(q: torch.Tensor) -> torch.Tensor:
    """q int8 [N, K] -> tiles int8 [N_pad/16, K_pad/4, 16, 4]."""
    n, k = q.shape
    n_pad, k_pad = padded_rows(n), padded_inputs(k)
    tiles = weight_memory.empty((n_pad // TILE_N, k_pad // 4, TILE_N, 4), torch.int8)    # 2 MiB pages where it can
    for r0 in range(0, n_pad, _CHUNK_ROWS):
        r1 = min(r0 + _CHUNK_ROWS, n_pad)
        rows = torch.zeros(r1 - r0, k_pad, dtype=torch.int8)
        rows[: max(0, min(r1, n) - r0), :k] = q[r0:min(r1, n)]
        # [rows, K_pad] -> [tiles, 16, K_pad/4, 4] -> [tiles, K_pad/4, 16, 4]
        tiles[r0 // TILE_N: r1 // TILE_N] = rows.view(-1, TILE_N, k_pad // 4, 4).permute(0, 2, 1, 3)
    return tiles


def pack_scales(scales: torch.Tensor) -> torch.Tensor:
    """scales [N] -> float32 [N_pad], padded rows 0."""
    out = torch.zeros(padded_rows(scales.shape[0]), dtype=torch.float32)
    out[: scales.shape[0]] = scales.float()
    return out


def unpack(tiles: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """tiles -> q int8 [out_features, in_features] (contiguous)."""
    return rows_into(tiles, 0, out_features, in_features,
                     torch.empty(out_features, in_features, dtype=torch.int8))


SMALL_GATHER = 16          # ids up to which gather_rows picks rows one by one (a decode batch)


def gather_rows(tiles: torch.Tensor, ids: torch.Tensor, in_features: int) -> torch.Tensor:
    """Rows `ids` (1-D, any order, repeats allowed) of q as int8 [len(ids), in_features], read from the tiles
    (an embedding lookup into a tied head)."""
    # a row's 4 consecutive inputs are one int32 of its tile: gathering int32s moves 4x fewer elements than
    # bytes (3x faster for 1000 rows); [T, K_pad/4, 16] int32 seen as [T, 16, K_pad/4] -> [R, K_pad/4]
    words = tiles.view(torch.int32).view(tiles.shape[0], tiles.shape[1], TILE_N).permute(0, 2, 1)
    if ids.numel() <= SMALL_GATHER:
        # a decode step's few tokens: rows picked by Python ints, where the tensor index arithmetic below (a floor
        # division, a remainder, an advanced index) cost a tiny model's step ~9% (py-spy, bundled model, 1 client)
        picked = torch.stack([words[i // TILE_N, i % TILE_N] for i in ids.tolist()]) if ids.numel() else \
            words.new_empty((0, words.shape[2]))
        return picked.view(torch.int8)[:, :in_features]
    return words[ids // TILE_N, ids % TILE_N].view(torch.int8)[:, :in_features]


def rows_into(tiles: torch.Tensor, r0: int, r1: int, in_features: int, out: torch.Tensor) -> torch.Tensor:
    """Rows r0:r1 of q written into out [r1 - r0, in_features] (any dtype: int8 values are exact in bf16),
    read tile by tile; returns out."""
    t0, t1 = r0 // TILE_N, -(-r1 // TILE_N)
    k_pad = tiles.shape[1] * 4
    if r0 % TILE_N == 0 and r1 % TILE_N == 0 and in_features == k_pad:      # whole tiles: one strided copy
        out.view(t1 - t0, TILE_N, k_pad // 4, 4).copy_(tiles[t0:t1].permute(0, 2, 1, 3))
        return out
    rows = tiles[t0:t1].permute(0, 2, 1, 3).reshape((t1 - t0) * TILE_N, k_pad)       # [16 T, K_pad]
    return out.copy_(rows[r0 - t0 * TILE_N: r1 - t0 * TILE_N, :in_features])
