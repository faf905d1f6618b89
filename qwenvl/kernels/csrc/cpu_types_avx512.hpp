// Vector types and operations for AVX-512 (F, BW, VL, VNNI, BF16): 16 lanes of 32 bits.
// Included only by translation units compiled for this ISA (see isa_avx512.hpp). No torch headers here:
// every inline function in this file is compiled with AVX-512 enabled, and must never be linked into code
// that runs on a CPU without it.
#pragma once
#include <immintrin.h>
#include <cstdint>
#include <cstring>

namespace QWENVL_ISA_NS {

constexpr int kDotChains = 8;       // independent accumulators a row wants (int4_kernel.hpp)
constexpr int kLanes = 16;          // 32-bit lanes per vector

struct FVec { __m512 v; };          // float32 x 16
struct IVec { __m512i v; };         // int32 x 16 (or 64 bytes)

inline FVec fzero() { return {_mm512_setzero_ps()}; }
inline IVec izero() { return {_mm512_setzero_si512()}; }
inline FVec fbroadcast(float x) { return {_mm512_set1_ps(x)}; }
inline FVec fadd(FVec a, FVec b) { return {_mm512_add_ps(a.v, b.v)}; }
inline FVec fsub(FVec a, FVec b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline FVec fmul(FVec a, FVec b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline FVec fmadd(FVec a, FVec b, FVec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline IVec iadd(IVec a, IVec b) { return {_mm512_add_epi32(a.v, b.v)}; }
inline FVec to_float(IVec a) { return {_mm512_cvtepi32_ps(a.v)}; }
inline void fstore(float* p, FVec a) { _mm512_storeu_ps(p, a.v); }
inline FVec fload(const float* p) { return {_mm512_loadu_ps(p)}; }
// bf16 -> float32 is exact: the bf16 bits are the float's upper half.
inline FVec fload(const uint16_t* p) {
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
}

// 4 * kLanes bytes of packed nibbles -> (low nibbles, high nibbles), each a vector of bytes 0..15.
inline void load_nibbles(const uint8_t* p, IVec& lo, IVec& hi) {
  const __m512i mask = _mm512_set1_epi8(0x0F);
  __m512i b = _mm512_loadu_si512(p);
  lo.v = _mm512_and_si512(b, mask);
  hi.v = _mm512_and_si512(_mm512_srli_epi16(b, 4), mask);
}

// The same bytes as (low nibbles, 16 x high nibbles): two ANDs, no shift. A dot product over the second
// is 16 times the high nibbles' one, exactly (bytes 0..240, |sum| < 2^31), so its sums are shifted right by
// 4 once per group instead of each 64 bytes by 4 (int4_kernel.hpp uses it where few rows share the unpack).
constexpr bool kHighX16 = true;
inline void load_nibbles_x16(const uint8_t* p, IVec& lo, IVec& hi16) {
  __m512i b = _mm512_loadu_si512(p);
  lo.v = _mm512_and_si512(b, _mm512_set1_epi8(0x0F));
  hi16.v = _mm512_and_si512(b, _mm512_set1_epi8(static_cast<char>(0xF0)));
}
inline IVec idiv16_exact(IVec a) { return {_mm512_srai_epi32(a.v, 4)}; }   // a multiple of 16 over 16

// acc[lane] += sum_{j<4} u8(w[4 lane + j]) * s8(a4 byte j): one VNNI vpdpbusd. Exact (|sum| < 2^31).
inline IVec dot4_accumulate(IVec acc, IVec w_u8, int32_t a4) {
  return {_mm512_dpbusd_epi32(acc.v, w_u8.v, _mm512_set1_epi32(a4))};
}

inline FVec fmax_(FVec a, FVec b) { return {_mm512_max_ps(a.v, b.v)}; }
// vpdpbusd accumulates in int32 directly: no int16 pair sums (the AVX2 header says why it has them).
constexpr bool kPairSums16 = false;
inline IVec dot4_pairs16(IVec acc16, IVec w_u8, int32_t a4) {
  return {_mm512_add_epi16(acc16.v, _mm512_maddubs_epi16(w_u8.v, _mm512_set1_epi32(a4)))};
}
inline IVec widen_pairs16(IVec acc, IVec pairs16) {
  return {_mm512_add_epi32(acc.v, _mm512_madd_epi16(pairs16.v, _mm512_set1_epi16(1)))};
}

// fp16 -> float32 and u8 -> float32, both exact (the int4 kernel's super-block parameters, Q4_K's d and sc).
inline FVec fload_f16(const uint16_t* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
inline FVec fload_u8(const uint8_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))))};
}

inline float hmax(FVec a) { return _mm512_reduce_max_ps(a.v); }
inline FVec fabs_(FVec a) { return {_mm512_abs_ps(a.v)}; }

// Round to nearest even (the default MXCSR mode, as torch.round), store as int8 (|values| <= 127 by
// construction), give the rounded values back as floats, and return the lanes' sum.
inline int32_t round_store_i8(FVec x, int8_t* out, FVec& rounded) {
  __m512i q = _mm512_cvtps_epi32(x.v);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(q));
  rounded.v = _mm512_cvtepi32_ps(q);
  return _mm512_reduce_add_epi32(q);
}

}  // namespace QWENVL_ISA_NS

namespace QWENVL_ISA_NS {

// ---- int8 x int8 dot products (int8_kernel.hpp). vpdpbusd multiplies unsigned by signed bytes, so the
// signed weights are flipped to w + 128 in the register (one xor per 64 bytes, shared by every activation
// row) and the extra 128 * sum(a) of each activation block is started off as the accumulator's value.
inline IVec iload(const int8_t* p) { return {_mm512_loadu_si512(p)}; }
inline IVec ibroadcast(int32_t v) { return {_mm512_set1_epi32(v)}; }
inline IVec s8_dot_operand(IVec w) { return {_mm512_xor_si512(w.v, _mm512_set1_epi8(static_cast<char>(0x80)))}; }
inline int32_t s8_dot_start(int32_t block_sum_a) { return -128 * block_sum_a; }
// acc[lane] += sum_{j<4} s8(w[4 lane + j]) * s8(a4 byte j), w given as s8_dot_operand(w). Exact in int32.
inline IVec dot4_s8(IVec acc, IVec w_op, int32_t a4) {
  return {_mm512_dpbusd_epi32(acc.v, w_op.v, _mm512_set1_epi32(a4))};
}

}  // namespace QWENVL_ISA_NS

#ifdef QWENVL_WITH_AVX512_BF16      // set by bf16_avx512.cpp, whose target has AVX512_BF16
namespace QWENVL_ISA_NS {
// ---- bf16 dot products (bf16_kernel.hpp), only in the translation unit compiled with AVX512_BF16:
// vdpbf16ps adds the products of 16 pairs of bf16 into 16 float lanes (32 inputs per step).
constexpr int kBf16Step = 32;
struct BVec { __m512bh v; };
inline BVec bload(const uint16_t* p) { return {(__m512bh)_mm512_loadu_si512(p)}; }
inline BVec bload_partial(const uint16_t* p, int n) {       // the first n < 32 values, zeros after
  return {(__m512bh)_mm512_maskz_loadu_epi16(static_cast<__mmask32>((1u << n) - 1), p)};
}
inline FVec bdot(FVec acc, BVec w, BVec x) { return {_mm512_dpbf16_ps(acc.v, x.v, w.v)}; }
inline float hsum(FVec a) { return _mm512_reduce_add_ps(a.v); }
}  // namespace QWENVL_ISA_NS
#endif
