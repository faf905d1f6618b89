// The int8 decode product, written once over the vector interface of cpu_types_<isa>.hpp and compiled once
// per ISA (int8_avx512.cpp, int8_avx2.cpp) inside QWENVL_ISA_NS.
//
// Weights: int8 q in -127..127 with one float scale per output row (Int8Linear's form), in tiles of 16 rows
// (built by qwenvl/kernels/int8_layout.py): [N_pad/16][K/4][16][4] bytes, so one 64-byte load is 4
// consecutive inputs of each of 16 rows, vpdpbusd's operand against 4 activation bytes broadcast: 16
// outputs advance by 4 inputs per instruction, no horizontal sums, and the bytes read are the weights
// themselves (no per-block sums or scales: 5% fewer bytes than llama.cpp's Q8_0).
// Activations: quantised per block of 32 by quantize_activation_blocks (kernels.hpp), as llama.cpp's Q8_0.
// Per block the integer dot product is exact; it is turned into float once per block,
// acc = fma(float(I), d, acc), block by block in order; a row's passes are added from the finest, then
// y = acc * scale (+ bias). Both ISAs compute the same integers and the same float operations, so they give
// the same bytes; each output is computed by one thread in one order, so the thread count and the other
// rows of the batch do not change a row's result.
//
// Cold reads. A decode step reads every tile once (~1.5 GB at 2B widths), far more than the cache holds,
// so one row's product runs at the rate memory feeds a loop reading in this order, not at its arithmetic
// (hot in L2 one row reads 80-90 GB/s per core). bench/int8_read_ceiling.py measures that rate with a
// read-only SIMD pass over the same tiles, split over the same threads (at::parallel_for hands each thread
// one contiguous range of tiles, so each streams one run of memory), and prints the kernel against it;
// bench/int8_prefetch.py builds this file at several prefetch distances and times them side by side.
// What paid, one thread, 374 MB of a decode step's matrices, medians of 9 alternating rounds on the shared
// 2-core Xeon VM (busy: absolute GB/s well under its quiet ones; the ratios are the point):
//   - the hardware prefetchers alone left the kernel at 93% of the read pass (1 row) and 63% (8 rows);
//     asking for each line kPrefetchBytes ahead on a tile's first pass: 97% and 77%. Distances 1-4 KiB were
//     within a few % of each other, 8 KiB lost; 2 KiB is kept. The 8-row pass over 1-row pass time went
//     from 1.47x to 1.27x (target <= 1.4x).
//   - 2 MiB pages (the tiles are allocated on them: qwenvl/kernels/weight_memory.py): the read pass and the
//     1-row product through Int8Linear both ran 1.1x faster than on 4 KiB pages in the same process
//     (int8_read_ceiling.py, 7 rounds), and prefetching mattered more on 4 KiB pages (74% -> 87% of their
//     read pass), where the hardware prefetchers stop at each page's end.
// Not kept: a second chain per row for 8 rows (spills: 2.3x slower hot); prefetch with the NTA hint (half
// the rate). Eight rows are bound by the arithmetic (one vpdpbusd a cycle: 18-22 GB/s per core hot) rather
// than by memory; an AMX (tdpbssd) prototype of the 8- and 16-row passes ran ~1.3x faster hot but slower
// for 2 rows, and is not in this file.
#pragma once
#include <cstring>
#include "kernels.hpp"

namespace QWENVL_ISA_NS {
namespace int8_tiles {

using qwenvl_kernels::Int8MatmulArgs;

constexpr int kTileN = 16;                          // output rows per tile
constexpr int kBlockK = 32;                         // inputs per activation block
constexpr int kBlockBytes = kTileN * kBlockK;       // 512 bytes of a tile per block
// Rows of x per pass over a tile: each holds an int32 and a float accumulator in registers (32 zmm / 16 ymm).
constexpr int kMaxRowBlock = kLanes == 16 ? 8 : 4;
// How far ahead of its reads the first pass over a tile asks for the weights (software prefetch into L1;
// 0: none). A macro so that bench/int8_prefetch.py can build the kernel at other distances beside this one.
#ifndef QWENVL_INT8_PREFETCH_BYTES
#define QWENVL_INT8_PREFETCH_BYTES 2048
#endif
constexpr int64_t kPrefetchBytes = QWENVL_INT8_PREFETCH_BYTES;

inline int32_t load_i32(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

inline uint16_t float_to_bf16(float f) {            // round to nearest even, as torch's .to(bfloat16)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);      // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// One tile (16 outputs) for RB virtual rows of x starting at r0, into out[RB][16] (float32, before scales).
// Each row's integer sums run in kChains independent chains (summed before the float step: integers are
// exact in any order): a dot product waits ~5 cycles for its accumulator, so one row in one chain would be
// bound by that latency rather than by the reads (as in int4_kernel.hpp; for int8 no change was measured
// on this 2-core host: 71 against 73 GB/s hot, one row, within its noise).
template <int RB>
inline void tile_product(const Int8MatmulArgs& p, const int8_t* w, int64_t r0, float* out, bool prefetch) {
  constexpr int kChains = kLanes == 16 ? (RB >= 8 ? 1 : 8 / RB) : (RB >= 4 ? 1 : 4 / RB);
  const int64_t K = p.K, blocks = K / kBlockK;
  const int8_t* a = p.x.a + r0 * K;
  const float* d = p.x.d + r0 * blocks;
  const int32_t* asum = p.block_sums + r0 * blocks;
  for (int h = 0; h < kTileN / kLanes; ++h) {      // AVX2: the tile's two 8-row halves in turn
    FVec acc[RB];
    for (int r = 0; r < RB; ++r) acc[r] = fzero();
    const int8_t* wb = w + h * kLanes * 4;
    // only the first pass over a tile streams it from memory: later row blocks and AVX2's second half hit L2
    const bool ahead = kPrefetchBytes > 0 && prefetch && h == 0;
    for (int64_t b = 0; b < blocks; ++b, wb += kBlockBytes) {
      if (ahead)        // past the thread's last tile it touches the next one's bytes: harmless, never a fault
        for (int c = 0; c < kBlockBytes; c += 64)
          _mm_prefetch(reinterpret_cast<const char*>(wb) + kPrefetchBytes + c, _MM_HINT_T0);
      IVec isum[RB][kChains];
      for (int r = 0; r < RB; ++r) {
        isum[r][0] = ibroadcast(s8_dot_start(asum[r * blocks + b]));
        for (int j = 1; j < kChains; ++j) isum[r][j] = izero();
      }
      for (int c = 0; c < kBlockK / 4; ++c) {
        const IVec wv = s8_dot_operand(iload(wb + c * 64));
        for (int r = 0; r < RB; ++r) {
          IVec& s = isum[r][c % kChains];
          s = dot4_s8(s, wv, load_i32(a + r * K + b * kBlockK + c * 4));
        }
      }
      for (int r = 0; r < RB; ++r) {
        for (int j = 1; j < kChains; ++j) isum[r][0] = iadd(isum[r][0], isum[r][j]);
        acc[r] = fmadd(to_float(isum[r][0]), fbroadcast(d[r * blocks + b]), acc[r]);
      }
    }
    for (int r = 0; r < RB; ++r) fstore(out + r * kTileN + h * kLanes, acc[r]);
  }
}

template <int RB = 1>
inline void tile_rows(int rb, const Int8MatmulArgs& p, const int8_t* w, int64_t r0, float* out) {
  if constexpr (RB <= kMaxRowBlock) {
    if (rb == RB) return tile_product<RB>(p, w, r0, out, r0 == 0);
    tile_rows<RB + 1>(rb, p, w, r0, out);
  }
}

inline void matmul_tiles(const Int8MatmulArgs& p, int64_t tile_begin, int64_t tile_end) {
  const int64_t tile_bytes = p.K * kTileN, passes = p.x.passes, vrows = p.rows * passes;
  alignas(64) float out[16 * qwenvl_kernels::kMaxPasses * kTileN];       // [virtual row][16]
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    const int8_t* w = p.w + t * tile_bytes;
    const int64_t n0 = t * kTileN, n_here = p.N - n0 < kTileN ? p.N - n0 : kTileN;
    for (int64_t r0 = 0; r0 < vrows; r0 += kMaxRowBlock) {
      const int rb = static_cast<int>(vrows - r0 < kMaxRowBlock ? vrows - r0 : kMaxRowBlock);
      tile_rows(rb, p, w, r0, out + r0 * kTileN);
    }
    for (int64_t r = 0; r < p.rows; ++r) {
      const float* v = out + r * passes * kTileN;
      float o[kTileN];
      for (int n = 0; n < kTileN; ++n) o[n] = v[(passes - 1) * kTileN + n];
      for (int64_t q = passes - 2; q >= 0; --q)         // the passes summed from the finest, in a fixed order
        for (int n = 0; n < kTileN; ++n) o[n] = v[q * kTileN + n] + o[n];
      for (int64_t n = 0; n < n_here; ++n) {
        o[n] = o[n] * p.scales[n0 + n];
        if (p.bias) o[n] = o[n] + p.bias[n0 + n];
      }
      if (p.y_bf16) {
        uint16_t* y = static_cast<uint16_t*>(p.y) + r * p.N + n0;
        for (int64_t n = 0; n < n_here; ++n) y[n] = float_to_bf16(o[n]);
      } else {
        std::memcpy(static_cast<float*>(p.y) + r * p.N + n0, o, n_here * sizeof(float));
      }
    }
  }
}

}  // namespace int8_tiles

void int8_matmul_tiles(const qwenvl_kernels::Int8MatmulArgs& args, int64_t tile_begin, int64_t tile_end) {
  int8_tiles::matmul_tiles(args, tile_begin, tile_end);
}

void activation_block_sums(const int8_t* a, int64_t rows, int64_t K, int32_t* sums) {
  const int64_t blocks = K / int8_tiles::kBlockK;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < blocks; ++b) {
      const int8_t* ab = a + r * K + b * int8_tiles::kBlockK;
      int32_t s = 0;
      for (int i = 0; i < int8_tiles::kBlockK; ++i) s += ab[i];
      sums[r * blocks + b] = s;
    }
}

}  // namespace QWENVL_ISA_NS
