// The bf16 decode product y = x @ W.T (+ bias) over nn.Linear's own weight W [N, K] (bf16, rows contiguous),
// written once over the bf16 operations of cpu_types_<isa>.hpp (bload, bdot, hsum) and compiled per ISA
// (bf16_avx512.cpp with AVX512_BF16, bf16_avx2.cpp).
//
// Why the plain layout: a bf16 weight is read as the layer holds it, so nothing is repacked, the layer
// keeps one copy, prefill's GEMM and a tied embedding use the same matrix. Each accumulator gathers
// products along K in lanes (vdpbf16ps: 2 products per lane per 32 inputs; AVX2: 1 per lane per 8), summed
// across lanes once at the end of the row: a horizontal sum per output, not per step. O outputs x R rows
// run at once (O * R accumulators in registers), so each weight vector loaded serves R rows and the
// dependency chains are independent. Every (row, output) pair takes the same operations in the same order
// whatever O, R or the thread count: a row's result does not depend on its batch or the threads.
#pragma once
#include <cstring>
#include "kernels.hpp"

namespace QWENVL_ISA_NS {
namespace bf16_rows {

using qwenvl_kernels::Bf16MatmulArgs;

constexpr int kMaxRowBlock = kLanes == 16 ? 16 : 8;

inline uint16_t float_to_bf16(float f) {            // round to nearest even, as torch's .to(bfloat16)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);      // NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Outputs at once for R rows: O * R accumulators (+ O weights, 1 activation) within the registers.
template <int R>
constexpr int outputs_at_once() {
  if constexpr (kLanes == 16) return R <= 4 ? 4 : R <= 8 ? 2 : 1;
  else return R <= 2 ? 4 : R <= 4 ? 2 : 1;
}

// Outputs n0 .. n0 + O - 1 for rows r0 .. r0 + R - 1 into out[o][r] (row stride kMaxRowBlock).
template <int R, int O>
inline void product(const Bf16MatmulArgs& p, int64_t n0, int64_t r0, float* out) {
  const int64_t K = p.K;
  const uint16_t* w = p.w + n0 * p.ldw;
  const uint16_t* x = p.x + r0 * p.ldx;
  FVec acc[R][O];
  for (int r = 0; r < R; ++r)
    for (int o = 0; o < O; ++o) acc[r][o] = fzero();
  int64_t i = 0;
  for (; i + kBf16Step <= K; i += kBf16Step) {
    BVec wv[O];
    for (int o = 0; o < O; ++o) wv[o] = bload(w + o * p.ldw + i);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const BVec xv = bload(x + r * p.ldx + i);
      for (int o = 0; o < O; ++o) acc[r][o] = bdot(acc[r][o], wv[o], xv);
    }
  }
  if (i < K) {            // the row's tail: zeros past its end add nothing
    const int n = static_cast<int>(K - i);
    BVec wv[O];
    for (int o = 0; o < O; ++o) wv[o] = bload_partial(w + o * p.ldw + i, n);
    for (int r = 0; r < R; ++r) {
      const BVec xv = bload_partial(x + r * p.ldx + i, n);
      for (int o = 0; o < O; ++o) acc[r][o] = bdot(acc[r][o], wv[o], xv);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int o = 0; o < O; ++o) out[o * kMaxRowBlock + r] = hsum(acc[r][o]);
}

// Outputs [n0, n1) for R rows: O at a time, then one at a time for the remainder.
template <int R>
inline void outputs(const Bf16MatmulArgs& p, int64_t n0, int64_t n1, int64_t r0, float* out) {
  constexpr int O = outputs_at_once<R>();
  int64_t n = n0;
  for (; n + O <= n1; n += O) product<R, O>(p, n, r0, out + (n - n0) * kMaxRowBlock);
  for (; n < n1; ++n) product<R, 1>(p, n, r0, out + (n - n0) * kMaxRowBlock);
}

template <int R = 1>
inline void row_block(int rb, const Bf16MatmulArgs& p, int64_t n0, int64_t n1, int64_t r0, float* out) {
  if constexpr (R <= kMaxRowBlock) {
    if (rb == R) return outputs<R>(p, n0, n1, r0, out);
    row_block<R + 1>(rb, p, n0, n1, r0, out);
  }
}

constexpr int64_t kChunk = 16;      // outputs per chunk of a thread's range

inline void matmul_rows(const Bf16MatmulArgs& p, int64_t n_begin, int64_t n_end) {
  alignas(64) float out[kChunk * kMaxRowBlock];          // [output][row]
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kChunk) {
    const int64_t n1 = n0 + kChunk < n_end ? n0 + kChunk : n_end;
    for (int64_t r0 = 0; r0 < p.rows; r0 += kMaxRowBlock) {
      const int rb = static_cast<int>(p.rows - r0 < kMaxRowBlock ? p.rows - r0 : kMaxRowBlock);
      row_block(rb, p, n0, n1, r0, out);
      for (int r = 0; r < rb; ++r) {
        uint16_t* y = p.y + (r0 + r) * p.N;
        for (int64_t n = n0; n < n1; ++n) {
          float v = out[(n - n0) * kMaxRowBlock + r];
          if (p.bias) v = v + bf16_to_float(p.bias[n]);
          y[n] = float_to_bf16(v);
        }
      }
    }
  }
}

}  // namespace bf16_rows

void bf16_matmul_rows(const qwenvl_kernels::Bf16MatmulArgs& args, int64_t n_begin, int64_t n_end) {
  bf16_rows::matmul_rows(args, n_begin, n_end);
}

}  // namespace QWENVL_ISA_NS
