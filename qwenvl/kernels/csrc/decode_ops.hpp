// The element-wise decode ops' entry points (decode_ops_kernel.hpp), one set per ISA namespace, in plain
// C++ like kernels.hpp: the ISA translation units include no torch header. decode_ops_bindings.cpp checks
// the tensors and calls the namespace the CPU supports. Every tensor is float32 or bfloat16 (`bf16`), one
// dtype for all of an op's operands; row strides are in elements.
#pragma once
#include <cstdint>

namespace qwenvl_kernels {

// sum = x + delta (rounded to the dtype, skipped when delta is null: then sum is x itself),
// y = weight * (sum * 1 / sqrt(mean(sum^2) + eps)), the statistic in float32, the normed value rounded to
// the dtype before the weight multiplies (as RMSNorm's PyTorch path rounds F.rms_norm's output).
struct AddRmsNormArgs {
  const void* x;
  const void* delta;          // or nullptr
  const void* weight;         // [D]
  void* sum;                  // [rows, D] contiguous (unused without delta)
  void* y;                    // [rows, D] contiguous
  bool bf16;
  int64_t rows, D, ldx, ld_delta;
  float eps;
};

// In place: each of `heads` heads of Dh channels (head h at x + r * ldx + h * Dh) becomes
// (x1 c - x2 s, x2 c + x1 s) on its halves, in float32 (rotary.rotate's arithmetic, bit for bit).
struct RotaryArgs {
  void* x;
  bool bf16;
  int64_t rows, ldx, heads, head_dim;
  const float* cos;           // [rows, >= head_dim / 2], row stride ld_table: the first halves
  const float* sin;
  int64_t ld_table;
};

// y[r, i] = silu(gate[r, i]) * up[r, i], gate = gate_up[r, 0:I], up = gate_up[r, I:2I]; silu(g) =
// g / (1 + exp(-g)) in float32 rounded to the dtype before the product (F.silu then mul_).
struct SiluMulArgs {
  const void* gate_up;        // row stride ld
  void* y;                    // [rows, I] contiguous
  bool bf16;
  int64_t rows, ld, I;
};

// One decode query per sequence b over its paged keys: writes the step's k/v (token context_lens[b] - 1)
// into its slot of the pool, then out[b, h] = softmax(scale * q[b, h] . K_b) V_b for query heads h, kv head
// h / (Hq / Hkv), in float32. The pool is [slots, Hkv, Dh]; token t of b sits in slot
// block_tables[b, t / block_size] * block_size + t % block_size.
struct PagedDecodeArgs {
  const void* q;              // [B, Hq, Dh], row stride ldq
  const void* k_new;          // [B, Hkv, Dh], row stride ldk
  const void* v_new;          // [B, Hkv, Dh], row stride ldv
  void* k_pool;
  void* v_pool;
  void* out;                  // [B, Hq, Dh] contiguous
  bool bf16;
  const int32_t* block_tables;  // [B, max_blocks]
  const int32_t* context_lens;  // [B]
  int64_t batch, q_heads, kv_heads, head_dim, block_size, max_blocks, ldq, ldk, ldv;
  float scale;
};

// Floats of scratch one attention task needs (decode_attention_tasks's `scratch`).
inline int64_t paged_decode_scratch(int64_t group, int64_t head_dim, int64_t context) {
  return group * (context + 2 * head_dim) + 64;
}

}  // namespace qwenvl_kernels

#define QWENVL_DECLARE_DECODE_OPS(ns)                                                                   \
  namespace ns {                                                                                        \
  void add_rms_norm_rows(const qwenvl_kernels::AddRmsNormArgs& args, int64_t row_begin, int64_t row_end); \
  void rotary_rows(const qwenvl_kernels::RotaryArgs& args, int64_t row_begin, int64_t row_end);          \
  void silu_mul_rows(const qwenvl_kernels::SiluMulArgs& args, int64_t row_begin, int64_t row_end);       \
  /* tasks t = b * Hkv + kv head, [task_begin, task_end); scratch: paged_decode_scratch(...) floats */   \
  void decode_attention_tasks(const qwenvl_kernels::PagedDecodeArgs& args, int64_t task_begin,          \
                              int64_t task_end, float* scratch);                                        \
  }

QWENVL_DECLARE_DECODE_OPS(qwenvl_avx512)
QWENVL_DECLARE_DECODE_OPS(qwenvl_avx2)
