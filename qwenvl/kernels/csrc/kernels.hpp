// The kernels' entry points, one set per ISA namespace (qwenvl_avx512, qwenvl_avx2), in plain C++ (raw
// pointers, no torch types): the ISA translation units include no torch header, so no inline function
// compiled for AVX-512 can be merged into code that runs on a CPU without it. bindings.cpp checks the
// tensors and calls the namespace the CPU supports.
#pragma once
#include <cstdint>

namespace qwenvl_kernels {

// Activations quantised to int8 per block of `block` inputs of a row (each row on its own), in `passes`
// passes (1 for bfloat16 activations, more where float32 precision is wanted), each pass a virtual row:
//   pass 0: d0 = max|x| / 127, v = x * (127 / max|x|) (0 where the block is all zero), a0 = round(v)
//   pass p: d_p = d_{p-1} / 254, v = (v - a_{p-1}) * 254, a_p = round(v)     (|v| <= 127 again)
// rounding half to even; xs_p = d_p * sum(a_p), the block's quantised sum (folds in a weight group's min).
// x = sum_p d_p a_p up to the last pass's rounding, d_P / 2: 2^-8 / 254^(P-1) of the block's max.
constexpr int64_t kMaxPasses = 4;
constexpr float kPassRadix = 254.0f;
struct ActivationBlocks {
  const int8_t* a;      // [rows * passes, K], row r's pass p at r * passes + p
  const float* d;       // [rows * passes, K / block]
  const float* xs;      // [rows * passes, K / block]
  int64_t passes;
};

// y[r, n] = sum_p sum_g s[n, g] * d[rp, g] * sum_{k in g} q[n, k] * a[rp, k] + m[n, g] * xs[rp, g], rp = r's pass p
// for the int4 tile layout (qwenvl/kernels/int4_layout.py): w = q * s + m, q in 0..15, groups of G inputs.
struct Int4MatmulArgs {
  ActivationBlocks x;           // quantised with block == G
  const uint8_t* w;             // [N_pad / 16][K / 32][4][64] bytes
  const void* params;           // [N_pad / 16][K / G][2][16]: scales then mins, float32 or bfloat16
  bool params_bf16;
  void* y;                      // [rows, N], float32 or bfloat16 (rounded to nearest even)
  bool y_bf16;
  int64_t rows, K, G, N;        // rows of x (each `x.passes` virtual rows)
};

}  // namespace qwenvl_kernels

#define QWENVL_DECLARE_KERNELS(ns)                                                                      \
  namespace ns {                                                                                        \
  /* x: [rows, K] float32 or bfloat16; a, d, xs as in ActivationBlocks; K a multiple of block, block a  \
     multiple of 16 */                                                                                  \
  void quantize_activation_blocks(const void* x, bool x_bf16, int64_t rows, int64_t K, int64_t block,  \
                                  int64_t passes, int8_t* a, float* d, float* xs);                      \
  /* output tiles [tile_begin, tile_end) of 16 rows each, every row of x; one thread per call */        \
  void int4_matmul_tiles(const qwenvl_kernels::Int4MatmulArgs& args, int64_t tile_begin,               \
                         int64_t tile_end);                                                             \
  }

QWENVL_DECLARE_KERNELS(qwenvl_avx512)
QWENVL_DECLARE_KERNELS(qwenvl_avx2)
