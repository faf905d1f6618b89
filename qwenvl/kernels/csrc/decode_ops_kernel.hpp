// The element-wise parts of a decode step, written once over the vector types of cpu_types_<isa>.hpp and
// cpu_math_<isa>.hpp and compiled per ISA (decode_ops_avx512.cpp, decode_ops_avx2.cpp): residual add +
// RMSNorm, rotary in place on the fused q/k output, silu(gate) * up, and decode attention straight from the
// paged pool (decode_ops.hpp says what each computes).
//
// Why: at batch 1 on the 2B-width model a step's weight products took ~38 ms (int4) and everything else
// ~17.5 ms, nearly all of it the fixed cost of ~25 small PyTorch ops per layer (dtype casts, index_select,
// bmm, softmax, cat), each a few to 60 us whatever its size. Each op here replaces 2 to 12 of them with one
// call that reads its operands once. The arithmetic is PyTorch's path's (float32 math, the same roundings
// to the dtype in the same places); where the order of a sum differs, reference.py states the bound.
// Every output row (or attention task) is computed whole by one thread in a fixed order: the bytes do not
// depend on the thread count.
#pragma once
#include "decode_ops.hpp"

namespace QWENVL_ISA_NS {
namespace decode_ops {

using qwenvl_kernels::AddRmsNormArgs;
using qwenvl_kernels::PagedDecodeArgs;
using qwenvl_kernels::RotaryArgs;
using qwenvl_kernels::SiluMulArgs;

// The first n < kLanes values (zeros after) and their store: a row's tail runs the same arithmetic.
template <typename T>
inline FVec load_n(const T* p, int64_t n) {
  T tmp[kLanes] = {};
  for (int64_t i = 0; i < n; ++i) tmp[i] = p[i];
  return fload(tmp);
}
template <typename T>
inline void store_n(T* p, FVec v, int64_t n) {
  T tmp[kLanes];
  fstore(tmp, v);
  for (int64_t i = 0; i < n; ++i) p[i] = tmp[i];
}
template <typename T>
inline FVec load_any(const T* p, int64_t n) { return n >= kLanes ? fload(p) : load_n(p, n); }
template <typename T>
inline void store_any(T* p, FVec v, int64_t n) {
  if (n >= kLanes) fstore(p, v);
  else store_n(p, v, n);
}

// The value a tensor of T holds for v.
inline FVec as_stored(FVec v, const float*) { return v; }
inline FVec as_stored(FVec v, const uint16_t*) { return bf16_round(v); }

template <typename T>
inline void add_rms_norm_row(const AddRmsNormArgs& p, int64_t r) {
  const int64_t D = p.D;
  const T* x = static_cast<const T*>(p.x) + r * p.ldx;
  const T* d = p.delta ? static_cast<const T*>(p.delta) + r * p.ld_delta : nullptr;
  const T* w = static_cast<const T*>(p.weight);
  T* sum = d ? static_cast<T*>(p.sum) + r * D : nullptr;
  T* y = static_cast<T*>(p.y) + r * D;
  FVec sq = fzero();                 // lane l sums the squares of inputs l, l + kLanes, ... (zeros pad)
  for (int64_t i = 0; i < D; i += kLanes) {
    FVec s = load_any(x + i, D - i);
    if (d) {
      s = as_stored(fadd(s, load_any(d + i, D - i)), x);
      store_any(sum + i, s, D - i);
    }
    sq = fadd(sq, fmul(s, s));
  }
  const float mean = reduce_add(sq) / static_cast<float>(D);
  const FVec inv = fbroadcast(1.0f / __builtin_sqrtf(mean + p.eps));
  const T* s_row = d ? sum : x;
  for (int64_t i = 0; i < D; i += kLanes) {
    const FVec normed = as_stored(fmul(load_any(s_row + i, D - i), inv), x);
    store_any(y + i, fmul(load_any(w + i, D - i), normed), D - i);
  }
}

template <typename T>
inline void rotary_row(const RotaryArgs& p, int64_t r) {
  const int64_t half = p.head_dim / 2;
  const float* c = p.cos + r * p.ld_table;
  const float* s = p.sin + r * p.ld_table;
  T* row = static_cast<T*>(p.x) + r * p.ldx;
  for (int64_t h = 0; h < p.heads; ++h) {
    T* x1p = row + h * p.head_dim;
    T* x2p = x1p + half;
    for (int64_t i = 0; i < half; i += kLanes) {
      const int64_t n = half - i;
      const FVec x1 = load_any(x1p + i, n), x2 = load_any(x2p + i, n);
      const FVec cv = load_any(c + i, n), sv = load_any(s + i, n);
      store_any(x1p + i, fsub(fmul(x1, cv), fmul(x2, sv)), n);
      store_any(x2p + i, fadd(fmul(x2, cv), fmul(x1, sv)), n);
    }
  }
}

template <typename T>
inline void silu_mul_row(const SiluMulArgs& p, int64_t r) {
  const T* g = static_cast<const T*>(p.gate_up) + r * p.ld;
  const T* u = g + p.I;
  T* y = static_cast<T*>(p.y) + r * p.I;
  const FVec one = fbroadcast(1.0f), zero = fzero();
  for (int64_t i = 0; i < p.I; i += kLanes) {
    const int64_t n = p.I - i;
    const FVec gv = load_any(g + i, n);
    const FVec silu = as_stored(fdiv(gv, fadd(one, fexp(fsub(zero, gv)))), g);
    store_any(y + i, fmul(silu, load_any(u + i, n)), n);
  }
}

// Calls fn(t, row) for the L tokens of sequence b in order, row pointing at token t's kv head `kvh` in the
// pool: walked block by block, so no division per token.
template <typename T, typename Fn>
inline void for_each_token(const PagedDecodeArgs& p, const T* pool, int64_t b, int64_t kvh, int64_t L, Fn fn) {
  const int32_t* table = p.block_tables + b * p.max_blocks;
  const int64_t bs = p.block_size, row_stride = p.kv_heads * p.head_dim;
  for (int64_t t0 = 0, blk = 0; t0 < L; t0 += bs, ++blk) {
    const T* row = pool + (static_cast<int64_t>(table[blk]) * bs * p.kv_heads + kvh) * p.head_dim;
    const int64_t n = L - t0 < bs ? L - t0 : bs;
    for (int64_t i = 0; i < n; ++i) fn(t0 + i, row + i * row_stride);
  }
}

// scores[g][t] = scale * (q_g . k_t) for NG query heads at once (each k row read once for all of them).
template <typename T, int NG>
inline void scores_for(const PagedDecodeArgs& p, const float* qf, const T* k_pool, int64_t b, int64_t kvh,
                       int64_t L, float* scores) {
  const int64_t Dh = p.head_dim;
  for_each_token(p, k_pool, b, kvh, L, [&](int64_t t, const T* k) {
    FVec acc[NG];
    for (int g = 0; g < NG; ++g) acc[g] = fzero();
    for (int64_t j = 0; j < Dh; j += kLanes) {
      const FVec kv = fload(k + j);
      for (int g = 0; g < NG; ++g) acc[g] = fmadd(fload(qf + g * Dh + j), kv, acc[g]);
    }
    for (int g = 0; g < NG; ++g) scores[g * L + t] = reduce_add(acc[g]) * p.scale;
  });
}

template <typename T, int NG = 8>
inline void scores_dispatch(int ng, const PagedDecodeArgs& p, const float* qf, const T* k_pool, int64_t b,
                            int64_t kvh, int64_t L, float* scores) {
  if constexpr (NG >= 1) {
    if (ng == NG) return scores_for<T, NG>(p, qf, k_pool, b, kvh, L, scores);
    scores_dispatch<T, NG - 1>(ng, p, qf, k_pool, b, kvh, L, scores);
  }
}

// out_g[j..j + NV kLanes) = sum_t probs[t] v_t[j..], in registers, streaming v over t.
template <typename T, int NV>
inline void weighted_values(const PagedDecodeArgs& p, const float* probs, const T* v_pool, int64_t b,
                            int64_t kvh, int64_t L, int64_t j, T* out) {
  FVec acc[NV];
  for (int u = 0; u < NV; ++u) acc[u] = fzero();
  for_each_token(p, v_pool, b, kvh, L, [&](int64_t t, const T* v) {
    const FVec pt = fbroadcast(probs[t]);
    for (int u = 0; u < NV; ++u) acc[u] = fmadd(pt, fload(v + j + u * kLanes), acc[u]);
  });
  for (int u = 0; u < NV; ++u) fstore(out + j + u * kLanes, acc[u]);
}

// softmax over n scores in place: exp(s - max) / sum, float32.
inline void softmax(float* s, int64_t n) {
  FVec m = fbroadcast(s[0]);
  for (int64_t i = 0; i < n; i += kLanes) {
    const int64_t c = n - i;
    m = fmax_lanes(m, c >= kLanes ? fload(s + i) : fmax_lanes(load_n(s + i, c), fbroadcast(s[0])));
  }
  const FVec mv = fbroadcast(reduce_max(m));
  FVec sum = fzero();
  for (int64_t i = 0; i < n; i += kLanes) {
    const int64_t c = n - i;
    FVec e = fexp(fsub(load_any(s + i, c), mv));
    if (c < kLanes) {             // the tail's padding must add nothing
      store_n(s + i, e, c);
      e = load_n(s + i, c);
    } else {
      fstore(s + i, e);
    }
    sum = fadd(sum, e);
  }
  const FVec total = fbroadcast(reduce_add(sum));
  for (int64_t i = 0; i < n; i += kLanes) store_any(s + i, fdiv(load_any(s + i, n - i), total), n - i);
}

template <typename T>
inline void decode_attention_task(const PagedDecodeArgs& p, int64_t task, float* scratch) {
  const int64_t b = task / p.kv_heads, kvh = task % p.kv_heads;
  const int64_t Dh = p.head_dim, G = p.q_heads / p.kv_heads, bs = p.block_size;
  const int64_t L = p.context_lens[b];
  T* k_pool = static_cast<T*>(p.k_pool);
  T* v_pool = static_cast<T*>(p.v_pool);
  {   // this step's token into its slot (this task owns kv head kvh of sequence b)
    const int64_t t = L - 1;
    const int64_t slot = static_cast<int64_t>(p.block_tables[b * p.max_blocks + t / bs]) * bs + t % bs;
    const T* kn = static_cast<const T*>(p.k_new) + b * p.ldk + kvh * Dh;
    const T* vn = static_cast<const T*>(p.v_new) + b * p.ldv + kvh * Dh;
    T* kd = k_pool + (slot * p.kv_heads + kvh) * Dh;
    T* vd = v_pool + (slot * p.kv_heads + kvh) * Dh;
    for (int64_t j = 0; j < Dh; ++j) {
      kd[j] = kn[j];
      vd[j] = vn[j];
    }
  }
  float* qf = scratch;                          // [G][Dh] the group's queries in float32
  float* scores = scratch + G * Dh;             // [G][L]
  const T* q = static_cast<const T*>(p.q) + b * p.ldq + kvh * G * Dh;
  for (int64_t i = 0; i < G * Dh; i += kLanes) fstore(qf + i, fload(q + i));
  for (int64_t g0 = 0; g0 < G; g0 += 8) {       // up to 8 heads share each read of a key
    const int ng = static_cast<int>(G - g0 < 8 ? G - g0 : 8);
    scores_dispatch<T>(ng, p, qf + g0 * Dh, k_pool, b, kvh, L, scores + g0 * L);
  }
  T* out = static_cast<T*>(p.out) + (b * p.q_heads + kvh * G) * Dh;
  for (int64_t g = 0; g < G; ++g) {
    softmax(scores + g * L, L);
    int64_t j = 0;         // 8 vectors of accumulators at a time (a whole head of 128 on AVX-512)
    for (; j + 8 * kLanes <= Dh; j += 8 * kLanes)
      weighted_values<T, 8>(p, scores + g * L, v_pool, b, kvh, L, j, out + g * Dh);
    for (; j < Dh; j += kLanes) weighted_values<T, 1>(p, scores + g * L, v_pool, b, kvh, L, j, out + g * Dh);
  }
}

}  // namespace decode_ops

void add_rms_norm_rows(const qwenvl_kernels::AddRmsNormArgs& args, int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    if (args.bf16) decode_ops::add_rms_norm_row<uint16_t>(args, r);
    else decode_ops::add_rms_norm_row<float>(args, r);
  }
}

void rotary_rows(const qwenvl_kernels::RotaryArgs& args, int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    if (args.bf16) decode_ops::rotary_row<uint16_t>(args, r);
    else decode_ops::rotary_row<float>(args, r);
  }
}

void silu_mul_rows(const qwenvl_kernels::SiluMulArgs& args, int64_t row_begin, int64_t row_end) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    if (args.bf16) decode_ops::silu_mul_row<uint16_t>(args, r);
    else decode_ops::silu_mul_row<float>(args, r);
  }
}

void decode_attention_tasks(const qwenvl_kernels::PagedDecodeArgs& args, int64_t task_begin, int64_t task_end,
                            float* scratch) {
  for (int64_t t = task_begin; t < task_end; ++t) {
    if (args.bf16) decode_ops::decode_attention_task<uint16_t>(args, t, scratch);
    else decode_ops::decode_attention_task<float>(args, t, scratch);
  }
}

}  // namespace QWENVL_ISA_NS
