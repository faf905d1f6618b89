// Rows of the int8 tile layout back into plain bfloat16 rows: the operand of prefill's bf16 GEMM
// (Int8Linear's _prefill_product). Baseline x86-64 code: the work is a reshuffle bound by memory, and every
// int8 value is exact in bfloat16 (its float32 bits' upper half), so no ISA-specific arithmetic is needed.
// Why here and not a PyTorch copy of the permuted view: that strided copy ran ~3x slower than the plain
// layout's cast (an 8960 x 1536 layer: 58-68 ms against 17-20 ms), which made int8 prefill slower.
#include <cstdint>
#include <cstring>

#include "kernels.hpp"

namespace qwenvl_kernels {

namespace {
inline uint16_t bf16_bits_of_small_int(int8_t v) {
  const float f = static_cast<float>(v);
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return static_cast<uint16_t>(bits >> 16);      // exact: an int8 needs 7 significant bits, bf16 keeps 8
}
}  // namespace

void int8_tiles_to_bf16_rows(const int8_t* tiles, int64_t k4_blocks, int64_t tile_begin, int64_t tile_end,
                             int64_t row_begin, int64_t row_end, int64_t K, uint16_t* out) {
  // tiles: [T][k4_blocks][16][4]; out: rows row_begin..row_end-1, each K values, row r at (r - row_begin) * K.
  uint16_t table[256];
  for (int v = 0; v < 256; ++v) table[v] = bf16_bits_of_small_int(static_cast<int8_t>(v));
  for (int64_t t = tile_begin; t < tile_end; ++t) {
    const int8_t* tile = tiles + t * k4_blocks * 64;
    for (int n = 0; n < 16; ++n) {
      const int64_t r = t * 16 + n;
      if (r < row_begin || r >= row_end) continue;
      uint16_t* dst = out + (r - row_begin) * K;
      const int8_t* src = tile + n * 4;
      const int64_t whole = K / 4;
      for (int64_t k4 = 0; k4 < whole; ++k4) {       // this row's 4 inputs of each 64-byte chunk
        const uint8_t* s = reinterpret_cast<const uint8_t*>(src + k4 * 64);
        dst[4 * k4] = table[s[0]];
        dst[4 * k4 + 1] = table[s[1]];
        dst[4 * k4 + 2] = table[s[2]];
        dst[4 * k4 + 3] = table[s[3]];
      }
      for (int64_t k = whole * 4; k < K; ++k)
        dst[k] = table[static_cast<uint8_t>(src[(k / 4) * 64 + k % 4])];
    }
  }
}

}  // namespace qwenvl_kernels
