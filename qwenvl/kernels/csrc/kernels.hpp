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
// The group parameters come in one of three forms (int4_layout.py):
//   kFloat32, kBfloat16  [N_pad / 16][K / G][2][16]: scales then mins
//   kSuperBlocks         G == 32, [N_pad / 16][K / 256][320] bytes, Q4_K's own: per tile and 256 inputs the 16
//                        rows' d (fp16), then their -dmin (fp16), then sc [8][16] and m [8][16] (uint8);
//                        s = d * sc and m = -dmin * m, formed in float32, where both products are exact
enum class Int4Params { kFloat32, kBfloat16, kSuperBlocks };
constexpr int64_t kSuperK = 256, kSuperBytes = 320;
struct Int4MatmulArgs {
  ActivationBlocks x;           // quantised with block == G
  const uint8_t* w;             // [N_pad / 16][K / 32][4][64] bytes
  const void* params;           // in `params_form`
  Int4Params params_form;
  void* y;                      // [rows, N], float32 or bfloat16 (rounded to nearest even)
  bool y_bf16;
  int64_t rows, K, G, N;        // rows of x (each `x.passes` virtual rows)
};

// y[r, n] = scale[n] * sum_p sum_b d[rp, b] * sum_{k in b} q[n, k] * a[rp, k] (+ bias[n]), blocks b of 32
// inputs, for the int8 tile layout (qwenvl/kernels/int8_layout.py): w = q * scale[n], q in -127..127.
struct Int8MatmulArgs {
  ActivationBlocks x;           // quantised with block == 32
  const int32_t* block_sums;    // [rows * passes, K / 32]: sum of each block's a (activation_block_sums)
  const int8_t* w;              // [N_pad / 16][K / 4][16][4]
  const float* scales;          // [N_pad]
  const float* bias;            // [N] or nullptr
  void* y;                      // [rows, N], float32 or bfloat16 (rounded to nearest even)
  bool y_bf16;
  int64_t rows, K, N;           // K a multiple of 32
};

// y[r, n] = sum_k W[n, k] * x[r, k] (+ bias[n]), all bf16, accumulated in float32, y rounded to bf16.
// Rows row_begin..row_end-1 of an int8 tile layout ([T][k4_blocks][16][4], tiles tile_begin..tile_end-1 hold
// them) as bfloat16 bits, K values a row (K <= 4 * k4_blocks), row r at out + (r - row_begin) * K.
void int8_tiles_to_bf16_rows(const int8_t* tiles, int64_t k4_blocks, int64_t tile_begin, int64_t tile_end,
                             int64_t row_begin, int64_t row_end, int64_t K, uint16_t* out);

// A Q4_K tensor's bytes, blocks [rows][K / 256][144] as ggml stores them, into tiles tile_begin..tile_end-1 of
// the int4 tile layout: packed [N_pad / 16][K / 32][4][64] and super-block params [N_pad / 16][K / 256][320]
// (Int4Params::kSuperBlocks); rows from `rows` on (the last tile's padding) are zeros.
void q4_k_to_tiles(const uint8_t* blocks, int64_t rows, int64_t K, int64_t tile_begin, int64_t tile_end,
                   uint8_t* packed, uint8_t* params);

// A Q6_K tensor's bytes, blocks [rows][K / 256][210] as ggml stores them (ql[128], qh[64], int8 scales[16],
// fp16 d), K a multiple of 256:
//   q6_k_rows           rows row_begin..row_end-1 as float32 values into out [row_end - row_begin][K], gguf's
//                       and ggml's dequantisation to the bit
//   q6_k_to_int4_tiles  tiles tile_begin..tile_end-1 of the int4 tile layout, packed [N_pad / 16][K / 32][4][64]
//                       and params [N_pad / 16][K / G][2][16] (bfloat16 bits when `bf16`, else float32), the
//                       values quantised as qwenvl's int4 quantiser does (q6_k.cpp); padded rows are zeros
constexpr int64_t kQ6KBytes = 210;
void q6_k_rows(const uint8_t* blocks, int64_t K, int64_t row_begin, int64_t row_end, float* out);
void q6_k_to_int4_tiles(const uint8_t* blocks, int64_t rows, int64_t K, int64_t G, bool bf16, int64_t tile_begin,
                        int64_t tile_end, uint8_t* packed, void* params);

struct Bf16MatmulArgs {
  const uint16_t* x;            // [rows, K], row stride ldx
  const uint16_t* w;            // [N, K], row stride ldw
  const uint16_t* bias;         // [N] or nullptr
  uint16_t* y;                  // [rows, N]
  int64_t ldx, ldw, rows, K, N;
};

}  // namespace qwenvl_kernels

#define QWENVL_DECLARE_BF16_KERNELS(ns)                                                                 \
  namespace ns {                                                                                        \
  /* outputs [n_begin, n_end) for every row of x; one thread per call */                                \
  void bf16_matmul_rows(const qwenvl_kernels::Bf16MatmulArgs& args, int64_t n_begin, int64_t n_end);    \
  }

QWENVL_DECLARE_BF16_KERNELS(qwenvl_avx512bf16)
QWENVL_DECLARE_BF16_KERNELS(qwenvl_avx2)

#define QWENVL_DECLARE_KERNELS(ns)                                                                      \
  namespace ns {                                                                                        \
  /* x: [rows, K] float32 or bfloat16; a, d, xs as in ActivationBlocks; K a multiple of block, block a  \
     multiple of 16 */                                                                                  \
  void quantize_activation_blocks(const void* x, bool x_bf16, int64_t rows, int64_t K, int64_t block,  \
                                  int64_t passes, int8_t* a, float* d, float* xs);                      \
  /* output tiles [tile_begin, tile_end) of 16 rows each, every row of x; one thread per call */        \
  void int4_matmul_tiles(const qwenvl_kernels::Int4MatmulArgs& args, int64_t tile_begin,               \
                         int64_t tile_end);                                                             \
  /* the int8 tile layout's product: output tiles [tile_begin, tile_end), every row; one thread per call */ \
  void int8_matmul_tiles(const qwenvl_kernels::Int8MatmulArgs& args, int64_t tile_begin, int64_t tile_end); \
  /* sums[r, b] = sum of a[r, 32 b .. 32 b + 31] (a [rows, K], K a multiple of 32) */                  \
  void activation_block_sums(const int8_t* a, int64_t rows, int64_t K, int32_t* sums);                 \
  }

QWENVL_DECLARE_KERNELS(qwenvl_avx512)
QWENVL_DECLARE_KERNELS(qwenvl_avx2)
