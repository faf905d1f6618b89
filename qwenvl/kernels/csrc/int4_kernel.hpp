// The int4 decode product and the activation quantisation, written once over the vector interface of
// cpu_types_<isa>.hpp and compiled once per ISA (int4_avx512.cpp, int4_avx2.cpp) inside QWENVL_ISA_NS.
//
// Weight tile layout (built by qwenvl/kernels/int4_layout.py): 16 output rows by 32 inputs are 256 bytes,
// four chunks of 64; chunk c holds inputs 8c..8c+7 of the 16 rows, row n in bytes 4n..4n+3, byte j with
// input 8c+j in its low nibble and 8c+4+j in its high one. So one 64-byte load and two masks give the
// bytes of 4 consecutive inputs for each of 16 rows, exactly vpdpbusd's operand (16 lanes x 4 u8), against
// 4 activation bytes broadcast: 16 outputs advance by 4 inputs per instruction, with no horizontal sums.
// A tile's blocks are contiguous along K, tiles one after the other: each thread streams its tiles.
//
// What bounds it (issue 36; bench/int4_variants.py times this file against a git revision's and a read-only
// pass over the same bytes; CPU time per core, the shared 2-core Xeon VM having no hardware counters):
//   - 1 row is bound by memory: hot in L2 one core computes ~55 GB/s of tile, cold it reads at 96% of the
//     read-only pass (1 and 2 threads). Per 256 bytes the loop is 8 vpdpbusd, 8 broadcast loads, 8 ANDs
//     (the high nibbles left in place, 16 x their value, shifted back once per group: before, a shift and an
//     AND more per 64 bytes, 20 vector ALU operations instead of 16), 4 prefetches, and the register
//     copies GCC adds between the chains (16, which move elimination should absorb).
//   - 8 rows are bound by vpdpbusd's one a cycle (2 per row per 64 bytes: ~14 GB/s a core hot, whatever is
//     cut around it); the software prefetch (as the int8 kernel's, 2 KiB ahead on a tile's first pass)
//     took them from 7.3 to 9.5-10 GB/s a core cold. Passes of 8 to 16 rows run on AMX where there is
//     one (int4_amx.hpp): 16 rows 1.35x faster cold, 8 rows ~1.3x hot but not faster cold.
#pragma once
#include <cstring>
#include "kernels.hpp"

namespace QWENVL_ISA_NS {

using qwenvl_kernels::Int4MatmulArgs;

constexpr int kTileN = 16;                          // output rows per tile
constexpr int kBlockK = 32;                         // inputs per 256-byte block
constexpr int kBlockBytes = kTileN * kBlockK / 2;
// Rows of x computed per pass over a tile: each needs an int32 and a float accumulator in registers
// (32 zmm / 16 ymm). More rows take further passes over the same tile, then in the L1/L2 cache.
constexpr int kMaxRowBlock = kLanes == 16 ? 8 : 4;
// How far ahead of its reads the first pass over a tile asks for the weights (software prefetch into L1;
// 0: none), and up to how many rows a pass keeps the high nibbles in place (kHighX16; 0: never). Macros so
// that bench/int4_variants.py can build the kernel with other values beside these.
#ifndef QWENVL_INT4_PREFETCH_BYTES
#define QWENVL_INT4_PREFETCH_BYTES 2048
#endif
#ifndef QWENVL_INT4_X16_ROWS
#define QWENVL_INT4_X16_ROWS 4
#endif
constexpr int64_t kPrefetchBytes = QWENVL_INT4_PREFETCH_BYTES;
constexpr int kHighX16Rows = QWENVL_INT4_X16_ROWS;


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

// One tile (16 outputs) for RB rows of x starting at r0, into out[RB][16] (float32). Each row's integer
// sums run in kChains independent chains where the ISA's dot product accumulates in place (vpdpbusd waits
// ~5 cycles for its accumulator: one row with one chain would be bound by that latency, not by the
// reads); AVX2's product feeds a 1-cycle add, so it keeps one chain and its 16 registers for rows.
// A tile's group parameters: scale and min of group g for the 16 rows' half h (kLanes rows), in float32.
template <typename T>                  // float32 or bfloat16 (uint16_t bits): [K / G][2][16]
struct GroupParams {
  const T* p;
  static int64_t tile_size(int64_t K, int64_t G) { return K / G * 2 * kTileN; }
  void load(int64_t g, int h, FVec& s, FVec& m) const {
    s = fload(p + g * 2 * kTileN + h * kLanes);
    m = fload(p + (g * 2 + 1) * kTileN + h * kLanes);
  }
};

struct SuperBlockParams {              // Q4_K's form, G == 32: [K / 256][320] bytes (kernels.hpp)
  const uint8_t* p;
  static int64_t tile_size(int64_t K, int64_t) { return K / qwenvl_kernels::kSuperK * qwenvl_kernels::kSuperBytes; }
  void load(int64_t g, int h, FVec& s, FVec& m) const {
    const uint8_t* sb = p + (g >> 3) * qwenvl_kernels::kSuperBytes;
    const int64_t j = g & 7;
    // d * sc: an 11-bit by a 6-bit significand, exact in float32, as is -dmin * m: the same values as the
    // float32 form holds, so the same result to the bit
    s = fmul(fload_f16(reinterpret_cast<const uint16_t*>(sb) + h * kLanes),
             fload_u8(sb + 64 + j * kTileN + h * kLanes));
    m = fmul(fload_f16(reinterpret_cast<const uint16_t*>(sb + 32) + h * kLanes),
             fload_u8(sb + 192 + j * kTileN + h * kLanes));
  }
};

template <int RB, typename Params>
inline void tile_product(const Int4MatmulArgs& p, const uint8_t* w, const Params prm, int64_t r0, float* out,
                         bool prefetch) {
  constexpr int kChains = kDotChains / RB > 1 ? kDotChains / RB : 1;
  // High nibbles left in place (16 x their value) where the unpack is not shared by many rows: even chains
  // take the low nibbles' products, odd ones the high ones', shifted back once per group (exact).
  constexpr bool kX16 = kHighX16 && RB <= kHighX16Rows && kChains % 2 == 0;
  const int64_t K = p.K, G = p.G, groups = K / G, blocks_per_group = G / kBlockK;
  const int8_t* a = p.x.a + r0 * K;
  const float* d = p.x.d + r0 * groups;
  const float* xs = p.x.xs + r0 * groups;
  for (int h = 0; h < kTileN / kLanes; ++h) {      // AVX2: the tile's two 8-row halves in turn
    FVec acc[RB];
    for (int r = 0; r < RB; ++r) acc[r] = fzero();
    const uint8_t* wb = w + h * kLanes * 4;
    // only the first pass over a tile streams it from memory: later row blocks and AVX2's second half hit L2
    const bool ahead = kPrefetchBytes > 0 && prefetch && h == 0;
    for (int64_t g = 0; g < groups; ++g) {
      IVec isum[RB][kChains];
      for (int r = 0; r < RB; ++r)
        for (int j = 0; j < kChains; ++j) isum[r][j] = izero();
      for (int64_t b = 0; b < blocks_per_group; ++b, wb += kBlockBytes) {
        if (ahead)      // past the thread's last tile it touches the next one's bytes: harmless, never a fault
          for (int c = 0; c < kBlockBytes; c += 64)
            _mm_prefetch(reinterpret_cast<const char*>(wb) + kPrefetchBytes + c, _MM_HINT_T0);
        const int64_t k0 = g * G + b * kBlockK;
        if constexpr (kPairSums16) {
          // a block's 8 pair sums per int16 lane reach at most 8 * 2 * 15 * 127 = 30480 < 2^15: exact,
          // widened to int32 once per block instead of once per product
          IVec s16[RB];
          for (int r = 0; r < RB; ++r) s16[r] = izero();
          for (int c = 0; c < 4; ++c) {
            IVec lo, hi;
            load_nibbles(wb + c * 64, lo, hi);
            for (int r = 0; r < RB; ++r) {
              const int8_t* ar = a + r * K + k0 + c * 8;
              s16[r] = dot4_pairs16(s16[r], lo, load_i32(ar));
              s16[r] = dot4_pairs16(s16[r], hi, load_i32(ar + 4));
            }
          }
          for (int r = 0; r < RB; ++r) isum[r][0] = widen_pairs16(isum[r][0], s16[r]);
        } else {
          for (int c = 0; c < 4; ++c) {
            IVec lo, hi;
            if constexpr (kX16) load_nibbles_x16(wb + c * 64, lo, hi);
            else load_nibbles(wb + c * 64, lo, hi);
            for (int r = 0; r < RB; ++r) {
              const int8_t* ar = a + r * K + k0 + c * 8;
              IVec& s_lo = isum[r][(2 * c) % kChains];
              s_lo = dot4_accumulate(s_lo, lo, load_i32(ar));
              IVec& s_hi = isum[r][(2 * c + 1) % kChains];
              s_hi = dot4_accumulate(s_hi, hi, load_i32(ar + 4));
            }
          }
        }
      }
      for (int r = 0; r < RB; ++r) {        // integer sums: exact in any order
        if constexpr (kX16) {
          for (int j = 2; j < kChains; j += 2) {
            isum[r][0] = iadd(isum[r][0], isum[r][j]);
            isum[r][1] = iadd(isum[r][1], isum[r][j + 1]);
          }
          isum[r][0] = iadd(isum[r][0], idiv16_exact(isum[r][1]));
        } else {
          for (int j = 1; j < kChains; ++j) isum[r][0] = iadd(isum[r][0], isum[r][j]);
        }
      }
      FVec s, m;
      prm.load(g, h, s, m);
      for (int r = 0; r < RB; ++r) {
        acc[r] = fmadd(fmul(s, fbroadcast(d[r * groups + g])), to_float(isum[r][0]), acc[r]);
        acc[r] = fmadd(m, fbroadcast(xs[r * groups + g]), acc[r]);
      }
    }
    for (int r = 0; r < RB; ++r) fstore(out + r * kTileN + h * kLanes, acc[r]);
  }
}

}  // namespace QWENVL_ISA_NS
#ifdef QWENVL_WITH_AMX
#include "int4_amx.hpp"
#endif
namespace QWENVL_ISA_NS {

template <typename Params, int RB = 1>
inline void tile_rows(int rb, const Int4MatmulArgs& p, const uint8_t* w, const Params prm, int64_t r0,
                      float* out) {
  if constexpr (RB <= kMaxRowBlock) {
    if (rb == RB) return tile_product<RB, Params>(p, w, prm, r0, out, r0 == 0);
    tile_rows<Params, RB + 1>(rb, p, w, prm, r0, out);
  }
}

template <typename Params, typename T>
void matmul_tiles(const Int4MatmulArgs& p, int64_t tile_begin, int64_t tile_end) {
  const int64_t tile_bytes = p.K * kTileN / 2, passes = p.x.passes;
  const int64_t vrows = p.rows * passes, tile_params = Params::tile_size(p.K, p.G);
  alignas(64) float out[16 * qwenvl_kernels::kMaxPasses * kTileN];       // [virtual row][16]
#ifdef QWENVL_WITH_AMX
  const bool use_amx = vrows >= amx::kMinRows && p.G <= amx::kMaxGroup && amx::usable();
  int configured = 0;                           // the rows the AMX tiles are configured for (0: none)
#else
  constexpr bool use_amx = false;
#endif
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    const uint8_t* w = p.w + t * tile_bytes;
    const Params prm{static_cast<const T*>(p.params) + t * tile_params};
    const int64_t n0 = t * kTileN, n_here = p.N - n0 < kTileN ? p.N - n0 : kTileN;
    if (use_amx) {
#ifdef QWENVL_WITH_AMX
      for (int64_t r0 = 0; r0 < vrows; r0 += amx::kMaxRows) {
        const int rb = static_cast<int>(vrows - r0 < amx::kMaxRows ? vrows - r0 : amx::kMaxRows);
        if (rb != configured) amx::configure(configured = rb, amx::kstep_for(p.G));
        amx::tile_product<Params>(p, w, prm, r0, rb, out + r0 * kTileN, r0 == 0);
      }
#endif
    } else {
      for (int64_t r0 = 0; r0 < vrows; r0 += kMaxRowBlock) {
        const int rb = static_cast<int>(vrows - r0 < kMaxRowBlock ? vrows - r0 : kMaxRowBlock);
        tile_rows<Params>(rb, p, w, prm, r0, out + r0 * kTileN);
      }
    }
    for (int64_t r = 0; r < p.rows; ++r) {
      const float* v = out + r * passes * kTileN;
      float o[kTileN];
      for (int n = 0; n < kTileN; ++n) o[n] = v[(passes - 1) * kTileN + n];
      for (int64_t q = passes - 2; q >= 0; --q)         // the passes summed from the finest, in a fixed order
        for (int n = 0; n < kTileN; ++n) o[n] = v[q * kTileN + n] + o[n];
      if (p.y_bf16) {
        uint16_t* y = static_cast<uint16_t*>(p.y) + r * p.N + n0;
        for (int64_t n = 0; n < n_here; ++n) y[n] = float_to_bf16(o[n]);
      } else {
        std::memcpy(static_cast<float*>(p.y) + r * p.N + n0, o, n_here * sizeof(float));
      }
    }
  }
#ifdef QWENVL_WITH_AMX
  if (configured) _tile_release();              // the thread's AMX state is not kept between products
#endif
}

void int4_matmul_tiles(const Int4MatmulArgs& p, int64_t tile_begin, int64_t tile_end) {
  using qwenvl_kernels::Int4Params;
  if (p.params_form == Int4Params::kBfloat16)
    matmul_tiles<GroupParams<uint16_t>, uint16_t>(p, tile_begin, tile_end);
  else if (p.params_form == Int4Params::kSuperBlocks)
    matmul_tiles<SuperBlockParams, uint8_t>(p, tile_begin, tile_end);
  else
    matmul_tiles<GroupParams<float>, float>(p, tile_begin, tile_end);
}

template <typename T>
void quantize_rows(const T* x, int64_t rows, int64_t K, int64_t block, int64_t passes, int8_t* a, float* d,
                   float* xs) {
  const int64_t blocks = K / block;
  const FVec radix = fbroadcast(qwenvl_kernels::kPassRadix);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const T* xb = x + r * K + b * block;
      FVec mx = fzero();
      for (int64_t i = 0; i < block; i += kLanes) mx = fmax_(mx, fabs_(fload(xb + i)));
      const float amax = hmax(mx);
      const FVec inv = fbroadcast(amax > 0.0f ? 127.0f / amax : 0.0f);
      int32_t sums[qwenvl_kernels::kMaxPasses] = {0, 0, 0, 0};
      for (int64_t i = 0; i < block; i += kLanes) {
        FVec v = fmul(fload(xb + i), inv);
        for (int64_t q = 0; q < passes; ++q) {
          int8_t* out = a + (r * passes + q) * K + b * block + i;
          FVec rounded;
          sums[q] += round_store_i8(v, out, rounded);
          v = fmul(fsub(v, rounded), radix);
        }
      }
      float step = amax / 127.0f;
      for (int64_t q = 0; q < passes; ++q) {
        d[(r * passes + q) * blocks + b] = step;
        xs[(r * passes + q) * blocks + b] = step * static_cast<float>(sums[q]);
        step = step / qwenvl_kernels::kPassRadix;
      }
    }
  }
}

void quantize_activation_blocks(const void* x, bool x_bf16, int64_t rows, int64_t K, int64_t block,
                                int64_t passes, int8_t* a, float* d, float* xs) {
  if (x_bf16)
    quantize_rows(static_cast<const uint16_t*>(x), rows, K, block, passes, a, d, xs);
  else
    quantize_rows(static_cast<const float*>(x), rows, K, block, passes, a, d, xs);
}

}  // namespace QWENVL_ISA_NS
