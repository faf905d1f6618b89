// More AVX-512 vector operations, for the element-wise decode ops (decode_ops_kernel.hpp): bf16 rounding
// and stores, a lane sum, exp. Kept beside cpu_types_avx512.hpp (same namespace, included after it) so the
// matrix kernels' header stays as it is; cpu_math_avx2.hpp has the same interface.
#pragma once
#include <immintrin.h>
#include <cstdint>

namespace QWENVL_ISA_NS {

inline float reduce_add(FVec a) { return _mm512_reduce_add_ps(a.v); }
inline float reduce_max(FVec a) { return _mm512_reduce_max_ps(a.v); }
inline FVec fmax_lanes(FVec a, FVec b) { return {_mm512_max_ps(a.v, b.v)}; }
inline FVec fdiv(FVec a, FVec b) { return {_mm512_div_ps(a.v, b.v)}; }

// The float nearest to v that bfloat16 holds (round to nearest even, as torch's .to(bfloat16)); NaN stays
// NaN (quietened).
inline FVec bf16_round(FVec v) {
  const __m512i u = _mm512_castps_si512(v.v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  r = _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v.v, v.v, _CMP_UNORD_Q);
  const __m512i quiet = _mm512_or_si512(_mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(0xffff0000u))),
                                        _mm512_set1_epi32(0x00400000));
  return {_mm512_castsi512_ps(_mm512_mask_mov_epi32(r, nan, quiet))};
}

// kLanes floats stored as bfloat16 (rounded to nearest even).
inline void fstore(uint16_t* p, FVec v) {
  const __m512i r = _mm512_srli_epi32(_mm512_castps_si512(bf16_round(v).v), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}

// exp(x) in float32, within ~2 ulp where the result is a normal float; 2^-126 at and below ~-87.34 (the
// true value is subnormal there), +inf from ~88.38 (as expf from 88.72: silu's x / (1 + exp(-x)) is -0
// either way, a softmax feeds it only x <= 0). Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, then a
// degree-6 polynomial (Cephes' expf coefficients), then 2^n through the exponent bits.
inline FVec fexp(FVec x) {
  const __m512 xc = _mm512_max_ps(_mm512_min_ps(x.v, _mm512_set1_ps(88.3762626647949f)),
                                  _mm512_set1_ps(-87.3365478515625f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_sub_ps(xc, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
  r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return {_mm512_mul_ps(p, _mm512_castsi512_ps(e))};
}

}  // namespace QWENVL_ISA_NS
