// llama.cpp's Q4_K blocks (a GGUF tensor's bytes) straight into the int4 tile layout with super-block
// parameters (int4_layout.py, kernels.hpp's Int4Params::kSuperBlocks). Baseline x86-64 code: a reshuffle of
// bytes, nothing computed. Why here and not in PyTorch: the same reshuffle as tensor operations (unpacking
// the 6-bit fields and the nibbles, then the tile permutation) took ~35 s of a 2B-width Q4_K_M load on 2
// cores, each step a pass over the whole tensor; this is one pass.
#include <cstdint>
#include <cstring>

#include "kernels.hpp"

namespace qwenvl_kernels {

namespace {
constexpr int64_t kQ4KBytes = 144;        // d, dmin (fp16), 12 bytes of 6-bit scales and mins, 128 of nibbles
constexpr int kRows = 16;                 // rows per tile

// Sub-block j's 6-bit scale and min from the 12 packed bytes (ggml's get_scale_min_k4).
inline void scale_min(const uint8_t* s, int j, uint8_t& sc, uint8_t& m) {
  if (j < 4) {
    sc = s[j] & 63;
    m = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}
}  // namespace

void q4_k_to_tiles(const uint8_t* blocks, int64_t rows, int64_t K, int64_t tile_begin, int64_t tile_end,
                   uint8_t* packed, uint8_t* params) {
  const int64_t supers = K / kSuperK, row_bytes = supers * kQ4KBytes;
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    uint8_t* tile = packed + t * K * kRows / 2;
    uint8_t* prm = params + t * supers * kSuperBytes;
    std::memset(tile, 0, K * kRows / 2);
    std::memset(prm, 0, supers * kSuperBytes);
    for (int n = 0; n < kRows && t * kRows + n < rows; ++n) {
      const uint8_t* row = blocks + (t * kRows + n) * row_bytes;
      for (int64_t s = 0; s < supers; ++s) {
        const uint8_t* b = row + s * kQ4KBytes;
        uint8_t* p = prm + s * kSuperBytes;
        p[2 * n] = b[0];                                   // d, as stored
        p[2 * n + 1] = b[1];
        p[32 + 2 * n] = b[2];                              // -dmin: dmin with its sign bit flipped (exact)
        p[32 + 2 * n + 1] = b[3] ^ 0x80;
        const uint8_t* qs = b + 16;
        for (int j = 0; j < 8; ++j) {                      // sub-block j: inputs 32 j .. 32 j + 31
          scale_min(b + 4, j, p[64 + j * kRows + n], p[192 + j * kRows + n]);
          // nibbles: 32 bytes per pair of sub-blocks, sub-block 2i in the low nibbles, 2i + 1 in the high
          const uint8_t* src = qs + (j / 2) * 32;
          const int shift = (j & 1) * 4;
          uint8_t* blk = tile + (s * 8 + j) * 256;         // the tile's block of 32 inputs
          for (int c = 0; c < 4; ++c)                       // chunk c: inputs 8c..8c+7 at row n's 4 bytes
            for (int i = 0; i < 4; ++i) {
              const uint8_t lo = (src[8 * c + i] >> shift) & 0x0F, hi = (src[8 * c + 4 + i] >> shift) & 0x0F;
              blk[c * 64 + 4 * n + i] = static_cast<uint8_t>(lo | (hi << 4));
            }
        }
      }
    }
  }
}

}  // namespace qwenvl_kernels
