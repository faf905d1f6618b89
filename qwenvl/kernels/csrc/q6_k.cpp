// llama.cpp's Q6_K blocks (a GGUF tensor's bytes) into float values, or straight into the int4 tile layout
// with qwenvl's own int4 quantisation of those values. Baseline x86-64 code, one call per range of rows or
// tiles (bindings.cpp runs them on torch's threads).
//
// Why here: a Q4_K_M file keeps its tied head (151936 x 1536) and half of ffn_down / attn_v in Q6_K. The
// `gguf` package's numpy dequantisation runs on one thread, and our int4 quantiser (quantize_int4 in
// layers/quantized_linear.py) then makes several passes over a float copy of the whole head: together most
// of a 2B-width Q4_K_M load (bench/README.md, issue 39). Here each 16-row tile is dequantised into a small
// per-thread buffer and quantised from there, one pass over the file's bytes.
//
// The arithmetic is the references' own, operation for operation, so the results are theirs to the bit:
//   dequantisation   gguf.quants (Q6_K.dequantize_blocks) and ggml's dequantize_row_q6_K: w = (d * sc) * q
//                    in float32, d the block's fp16, sc the 16-weight group's int8, q the 6-bit code - 32
//   int4             _quantize_int4_rows + Int4Linear.from_int4 + int4_layout.pack: per group of G, lo / hi
//                    the group's min / max with 0, scale = max((hi - lo) / 15, 1e-12) rounded to the
//                    parameter dtype, zero = round(-lo / scale), q = round(w / scale + zero), both clamped
//                    to 0..15, min = -(zero * scale) rounded to the parameter dtype; round half to even.
//                    A bfloat16 model rounds the values to bfloat16 first (the loader's `w.to(dtype)`).
// Lets GCC turn the clamps below into vector selects (with trapping math on it keeps them as branches, and the
// loops stay scalar); it changes no result: no reassociation, every operation still rounded as IEEE says.
#pragma GCC optimize("no-trapping-math")

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels.hpp"

namespace qwenvl_kernels {

namespace {
constexpr int kRows = 16;                 // rows per tile
constexpr int kBlockBytes = 256;          // bytes per 32 inputs of a tile (16 rows x 16 bytes)

float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF;
  uint32_t bits;
  if (exp == 0) {                         // zero or subnormal: mant * 2^-24, exact in float32
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    std::memcpy(&bits, &v, 4);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// float32 -> bfloat16 bits, round half to even (c10::BFloat16's rule; NaN -> the quiet NaN 0x7FC0).
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return 0x7FC0;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1)) >> 16);
}

inline float bf16_value(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float round_to_bf16(float f) { return bf16_value(bf16_bits(f)); }

// Round half to even for |v| < 2^22 under the default rounding mode, without libm (the baseline target has no
// SSE4.1 round instruction): adding 1.5 * 2^23 leaves no fraction bits (the compiler keeps both steps: no
// -ffast-math). Callers clamp v to a small range first.
inline float round_even(float v) {
  constexpr float kMagic = 12582912.0f;
  return (v + kMagic) - kMagic;
}
}  // namespace

void q6_k_rows(const uint8_t* blocks, int64_t K, int64_t row_begin, int64_t row_end, float* out) {
  const int64_t supers = K / kSuperK;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const uint8_t* row = blocks + r * supers * kQ6KBytes;
    float* y_row = out + (r - row_begin) * K;
    for (int64_t s = 0; s < supers; ++s) {
      const uint8_t* b = row + s * kQ6KBytes;
      const uint8_t* ql = b;                                   // 128 bytes: the codes' low nibbles
      const uint8_t* qh = b + 128;                             // 64 bytes: their high 2 bits
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);   // 16 scales, one per 16 weights
      const float d = fp16_to_float(static_cast<uint16_t>(b[208] | (b[209] << 8)));
      float ds[16];
      for (int i = 0; i < 16; ++i) ds[i] = d * static_cast<float>(sc[i]);
      float* y = y_row + s * kSuperK;
      // weight 128 h + 32 k + l: low nibble of ql[64 h + 32 (k & 1) + l] (high nibble for k >= 2),
      // bits 2k, 2k + 1 of qh[32 h + l]
      for (int h = 0; h < 2; ++h)
        for (int k = 0; k < 4; ++k) {
          const uint8_t* lo = ql + 64 * h + 32 * (k & 1);
          const uint8_t* hi = qh + 32 * h;
          const int shift = 4 * (k >> 1);
          float* yk = y + 128 * h + 32 * k;
          for (int half = 0; half < 2; ++half) {             // 16 weights a scale (written so it vectorises)
            const float dsc = ds[8 * h + 2 * k + half];
            for (int l = 16 * half; l < 16 * half + 16; ++l) {
              const int q = (((lo[l] >> shift) & 0x0F) | (((hi[l] >> (2 * k)) & 3) << 4)) - 32;
              yk[l] = dsc * static_cast<float>(q);
            }
          }
        }
    }
  }
}

void q6_k_to_int4_tiles(const uint8_t* blocks, int64_t rows, int64_t K, int64_t G, bool bf16, int64_t tile_begin,
                        int64_t tile_end, uint8_t* packed, void* params) {
  const int64_t groups = K / G;
  std::vector<float> w(K);
  std::vector<uint8_t> q(K);
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    uint8_t* tile = packed + t * K * kRows / 2;
    std::memset(tile, 0, K * kRows / 2);
    // params [T][K / G][2][16]: per group the 16 rows' scales, then their mins; padded rows stay 0
    float* pf = bf16 ? nullptr : static_cast<float*>(params) + t * groups * 2 * kRows;
    uint16_t* pb = bf16 ? static_cast<uint16_t*>(params) + t * groups * 2 * kRows : nullptr;
    if (bf16)
      std::memset(pb, 0, groups * 2 * kRows * sizeof(uint16_t));
    else
      std::memset(pf, 0, groups * 2 * kRows * sizeof(float));
    for (int n = 0; n < kRows && t * kRows + n < rows; ++n) {
      q6_k_rows(blocks, K, t * kRows + n, t * kRows + n + 1, w.data());
      if (bf16)
        for (int64_t k = 0; k < K; ++k) w[k] = round_to_bf16(w[k]);
      for (int64_t g = 0; g < groups; ++g) {
        const float* x = w.data() + g * G;
        // the range always holds 0; 8 lanes so the loop vectorises (a zero's sign does not matter below)
        float lo8[8] = {0.0f}, hi8[8] = {0.0f};
        for (int64_t i = 0; i < G; i += 8)
          for (int j = 0; j < 8; ++j) {
            lo8[j] = std::min(lo8[j], x[i + j]);
            hi8[j] = std::max(hi8[j], x[i + j]);
          }
        float lo = 0.0f, hi = 0.0f;
        for (int j = 0; j < 8; ++j) {
          lo = std::min(lo, lo8[j]);
          hi = std::max(hi, hi8[j]);
        }
        float scale = std::max((hi - lo) / 15.0f, 1e-12f);
        float mn;
        if (bf16) scale = round_to_bf16(scale);
        const float zero = std::min(std::max(round_even(std::min(-lo / scale, 16.0f)), 0.0f), 15.0f);
        uint8_t* qg = q.data() + g * G;
        for (int64_t i = 0; i < G; ++i) {
          const float v = std::min(std::max(x[i] / scale + zero, -1.0f), 16.0f);
          qg[i] = static_cast<uint8_t>(static_cast<int32_t>(std::min(std::max(round_even(v), 0.0f), 15.0f)));
        }
        mn = -(zero * scale);
        const int64_t at = g * 2 * kRows + n;
        if (bf16) {
          pb[at] = bf16_bits(scale);
          pb[at + kRows] = bf16_bits(mn);
        } else {
          pf[at] = scale;
          pf[at + kRows] = mn;
        }
      }
      // the tile layout (int4_layout.py): block b of 32 inputs, chunk c of 8, row n's 4 bytes at 4 n, byte j
      // with input 8c + j in its low nibble and 8c + 4 + j in its high one
      for (int64_t b = 0; b < K / 32; ++b)
        for (int c = 0; c < 4; ++c)
          for (int j = 0; j < 4; ++j) {
            const uint8_t* src = q.data() + 32 * b + 8 * c;
            tile[b * kBlockBytes + c * 64 + 4 * n + j] = static_cast<uint8_t>(src[j] | (src[4 + j] << 4));
          }
    }
  }
}

}  // namespace qwenvl_kernels
