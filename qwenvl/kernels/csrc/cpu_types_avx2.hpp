// Vector types and operations for AVX2 + FMA: 8 lanes of 32 bits, the same interface as
// cpu_types_avx512.hpp (see there). No VNNI: a 4-byte dot product is vpmaddubsw (u8 x s8 pairs summed into
// int16) then vpmaddwd against ones (pairs of int16 summed into int32). vpmaddubsw saturates, but the
// weights are nibbles: |2 * 15 * 127| = 3810 is far from 32767, so the sums stay exact.
#pragma once
#include <immintrin.h>
#include <cstdint>
#include <cstring>

namespace QWENVL_ISA_NS {

constexpr int kDotChains = 1;       // independent accumulators a row wants (int4_kernel.hpp)
constexpr int kLanes = 8;

struct FVec { __m256 v; };
struct IVec { __m256i v; };

inline FVec fzero() { return {_mm256_setzero_ps()}; }
inline IVec izero() { return {_mm256_setzero_si256()}; }
inline FVec fbroadcast(float x) { return {_mm256_set1_ps(x)}; }
inline FVec fadd(FVec a, FVec b) { return {_mm256_add_ps(a.v, b.v)}; }
inline FVec fsub(FVec a, FVec b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline FVec fmul(FVec a, FVec b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline FVec fmadd(FVec a, FVec b, FVec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline IVec iadd(IVec a, IVec b) { return {_mm256_add_epi32(a.v, b.v)}; }
inline FVec to_float(IVec a) { return {_mm256_cvtepi32_ps(a.v)}; }
inline void fstore(float* p, FVec a) { _mm256_storeu_ps(p, a.v); }
inline FVec fload(const float* p) { return {_mm256_loadu_ps(p)}; }
inline FVec fload(const uint16_t* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
}

inline void load_nibbles(const uint8_t* p, IVec& lo, IVec& hi) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  lo.v = _mm256_and_si256(b, mask);
  hi.v = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
}

// (low nibbles, 16 x high nibbles), as the AVX-512 header's; unused here (kHighX16): maddubs' int16 pair
// sums would saturate on bytes up to 240 (2 * 240 * 127 > 2^15).
constexpr bool kHighX16 = false;
inline void load_nibbles_x16(const uint8_t* p, IVec& lo, IVec& hi16) {
  __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  lo.v = _mm256_and_si256(b, _mm256_set1_epi8(0x0F));
  hi16.v = _mm256_and_si256(b, _mm256_set1_epi8(static_cast<char>(0xF0)));
}
inline IVec idiv16_exact(IVec a) { return {_mm256_srai_epi32(a.v, 4)}; }

inline IVec dot4_accumulate(IVec acc, IVec w_u8, int32_t a4) {
  __m256i pairs = _mm256_maddubs_epi16(w_u8.v, _mm256_set1_epi32(a4));
  return {_mm256_add_epi32(acc.v, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))};
}

inline FVec fmax_(FVec a, FVec b) { return {_mm256_max_ps(a.v, b.v)}; }
// Without VNNI a product's int16 pair sums are widened to int32 by a second instruction (vpmaddwd); the
// int4 kernel sums a block's pairs in int16 first and widens once (kPairSums16; exact, see there).
constexpr bool kPairSums16 = true;
inline IVec dot4_pairs16(IVec acc16, IVec w_u8, int32_t a4) {
  return {_mm256_add_epi16(acc16.v, _mm256_maddubs_epi16(w_u8.v, _mm256_set1_epi32(a4)))};
}
inline IVec widen_pairs16(IVec acc, IVec pairs16) {
  return {_mm256_add_epi32(acc.v, _mm256_madd_epi16(pairs16.v, _mm256_set1_epi16(1)))};
}

inline FVec fload_f16(const uint16_t* p) {         // exact, as the AVX-512 build's
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
inline FVec fload_u8(const uint8_t* p) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))};
}

inline float hmax(FVec a) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
inline FVec fabs_(FVec a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v)}; }

inline int32_t round_store_i8(FVec x, int8_t* out, FVec& rounded) {
  const __m256i qv = _mm256_cvtps_epi32(x.v);
  rounded.v = _mm256_cvtepi32_ps(qv);
  alignas(32) int32_t q[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(q), qv);
  int32_t sum = 0;
  for (int i = 0; i < 8; ++i) {
    out[i] = static_cast<int8_t>(q[i]);
    sum += q[i];
  }
  return sum;
}

}  // namespace QWENVL_ISA_NS

namespace QWENVL_ISA_NS {

// ---- int8 x int8 dot products (int8_kernel.hpp). vpmaddubsw multiplies u8 by s8 into int16 pairs, which
// would saturate for (w + 128) * a (2 * 255 * 127 > 32767). So the weights stay signed and a's sign moves
// onto them: |a| * (w * sign(a)) = w * a, pairs at most 2 * 127 * 127 = 32258 < 32767: exact.
inline IVec iload(const int8_t* p) { return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))}; }
inline IVec ibroadcast(int32_t v) { return {_mm256_set1_epi32(v)}; }
inline IVec s8_dot_operand(IVec w) { return w; }
inline int32_t s8_dot_start(int32_t) { return 0; }
inline IVec dot4_s8(IVec acc, IVec w, int32_t a4) {
  const __m256i a = _mm256_set1_epi32(a4);
  const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(a), _mm256_sign_epi8(w.v, a));
  return {_mm256_add_epi32(acc.v, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))};
}

// ---- bf16 dot products (bf16_kernel.hpp): bf16 widened to float (a 16-bit shift, exact), then FMA.
constexpr int kBf16Step = 8;
struct BVec { __m256 v; };
inline BVec bload(const uint16_t* p) { return {fload(p).v}; }
inline BVec bload_partial(const uint16_t* p, int n) {       // the first n < 8 values, zeros after
  uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(tmp, p, n * sizeof(uint16_t));
  return bload(tmp);
}
inline FVec bdot(FVec acc, BVec w, BVec x) { return {_mm256_fmadd_ps(w.v, x.v, acc.v)}; }
inline float hsum(FVec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace QWENVL_ISA_NS
