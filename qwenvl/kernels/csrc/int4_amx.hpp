// The int4 product's passes of many rows on AMX (Sapphire Rapids and later), included by int4_kernel.hpp in
// the AVX-512 build only (int4_avx512.cpp defines QWENVL_WITH_AMX and enables amx-tile and amx-int8).
//
// Why: a pass of R rows with vpdpbusd costs 2R of them per 64 bytes of tile, one a cycle, so 8 rows are
// bound by that arithmetic (~14 GB/s of tile a core, hot) rather than by memory, which a 1-row pass
// streams at. One tdpbssd multiplies up to 16 rows of 64 int8 activations by 64 x 16 int8 weights. The tile
// layout is already AMX's: chunk c's low nibbles are inputs 8c..8c+3 of the 16 rows, 4 bytes a row, which
// is one row of tdpbssd's B operand (its K/4 rows of 16 x 4 bytes), the high nibbles the next; so a pass
// unpacks 64 inputs (512 tile bytes) into a 1 KiB B buffer, loads the rows' activations as A straight from
// their [rows, K] buffer (stride K), and accumulates each group's int32 sums in C. The codes 0..15 are
// valid signed bytes, so tdpbssd (signed by signed) gives the same integer sums as vpdpbusd, exactly; the
// float step per group is tile_product's, in the same order: the same bytes out (tests check it).
// The process asks the kernel for the AMX register state once (arch_prctl); where that or the CPU says
// no, or QWENVL_INT4_AMX=0 is set, every pass runs on vpdpbusd as before.
#pragma once
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cstdlib>
#include <cstring>

namespace QWENVL_ISA_NS {
namespace amx {

// Products of at least this many virtual rows run on AMX, in passes of up to 16 rows. Measured with
// bench/int4_variants.py (one thread, CPU time, shared 2-core Xeon VM; GB/s of tile a core, AMX / vpdpbusd):
//   hot (768 KB in L2):   1 row 31 / 56, 4 rows 26 / 27, 8 rows 19-20 / 14-16, 16 rows 11-12 / 7-8
//   cold (a decode step): 1 row 14 / 15, 4 rows 12.6 / 12.3, 8 rows 10.5 / 10.2, 16 rows 7.7 / 5.7
// Fewer rows keep vpdpbusd: AMX pays a fixed unpack (the codes stored as bytes, loaded back as tiles) and a
// group's sums go through memory, where vpdpbusd keeps them in registers.
#ifndef QWENVL_INT4_AMX_MIN_ROWS
#define QWENVL_INT4_AMX_MIN_ROWS 8
#endif
constexpr int kMinRows = QWENVL_INT4_AMX_MIN_ROWS;
constexpr int kMaxRows = 16;                    // A and C tiles: 16 rows at most

inline bool usable() {
  static const bool ok = [] {
    const char* env = std::getenv("QWENVL_INT4_AMX");
    if (env && std::strcmp(env, "0") == 0) return false;
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 25) & 1)) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;           // Linux's arch_prctl request
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Two sets of tiles, so that one group's products need not wait for the last group's sums to be stored
// (tiles are not renamed): C = 0, 1 ([rows][16] int32), A = 2, 3 ([rows][kstep] int8), B = 4, 5
// ([kstep / 4][64] int8).
inline void configure(int rows, int kstep) {
  TileConfig cfg;
  for (int set = 0; set < 2; ++set) {
    cfg.rows[0 + set] = rows, cfg.colsb[0 + set] = 64;
    cfg.rows[2 + set] = rows, cfg.colsb[2 + set] = kstep;
    cfg.rows[4 + set] = kstep / 4, cfg.colsb[4 + set] = 64;
  }
  _tile_loadconfig(&cfg);
}

// Inputs per tdpbssd: 64, or 32 where the group size is an odd multiple of 32.
inline int kstep_for(int64_t G) { return G % 64 == 0 ? 64 : 32; }

constexpr int kMaxGroup = 256;    // Int4Linear's largest; larger groups (GPTQ's one per row) keep vpdpbusd

// A group's 64-input steps unpacked into B operands ([steps][16][64] bytes), streaming the tile from wb.
inline void unpack_group(const uint8_t*& wb, int64_t G, bool prefetch, int8_t* b) {
  for (int64_t c = 0; c < G / 8; ++c, wb += 64) {
    if (kPrefetchBytes > 0 && prefetch && c % 4 == 0)
      for (int l = 0; l < kBlockBytes; l += 64)
        _mm_prefetch(reinterpret_cast<const char*>(wb) + kPrefetchBytes + l, _MM_HINT_T0);
    IVec lo, hi;
    load_nibbles(wb, lo, hi);
    _mm512_store_si512(b + 2 * c * 64, lo.v);
    _mm512_store_si512(b + (2 * c + 1) * 64, hi.v);
  }
}

// Group g's integer sums into sums[rows][16], on tile set g % 2 (C, A, B): GCC's tile intrinsics paste
// their tile numbers into the instruction text, so the numbers are literals, one function per set.
#define QWENVL_AMX_GROUP_SUMS(name, C, A, B)                                                            \
  inline void name(const int8_t* a, const int8_t* b, int64_t K, int64_t G, int64_t kstep, int32_t* sums) { \
    _tile_zero(C);                                                                                      \
    for (int64_t k = 0; k < G; k += kstep) {                                                            \
      _tile_loadd(B, b + k * 16, 64);                                                                   \
      _tile_loadd(A, a + k, K);                                                                         \
      _tile_dpbssd(C, A, B);                                                                            \
    }                                                                                                   \
    _tile_stored(C, sums, 64);                                                                          \
  }
QWENVL_AMX_GROUP_SUMS(group_sums_0, 0, 2, 4)
QWENVL_AMX_GROUP_SUMS(group_sums_1, 1, 3, 5)
#undef QWENVL_AMX_GROUP_SUMS

// One tile (16 outputs) for rb (<= 16) virtual rows of x from r0, into out[rb][16], as tile_product's;
// the tiles configured for rb rows and kstep_for(G). Software-pipelined by group: group g + 1 is unpacked
// before group g's products are taken (a tile load never waits on the stores just made), and group g's
// sums are turned into floats after group g + 1's products are issued (nor a vector load on a tile store).
template <typename Params>
inline void tile_product(const Int4MatmulArgs& p, const uint8_t* w, const Params prm, int64_t r0, int rb,
                         float* out, bool prefetch) {
  const int64_t K = p.K, G = p.G, groups = K / G, kstep = kstep_for(G);
  const int8_t* a = p.x.a + r0 * K;
  const float* d = p.x.d + r0 * groups;
  const float* xs = p.x.xs + r0 * groups;
  alignas(64) int8_t bbuf[2][kMaxGroup * 16];   // two groups' B operands: 16 bytes per input
  alignas(64) int32_t cbuf[2][kMaxRows * 16];
  FVec acc[kMaxRows];
  for (int r = 0; r < rb; ++r) acc[r] = fzero();
  auto to_floats = [&](int64_t g) {             // group g's sums, in cbuf[g % 2], into the accumulators
    FVec s, m;
    prm.load(g, 0, s, m);
    for (int r = 0; r < rb; ++r) {
      const FVec sum = to_float(IVec{_mm512_load_si512(cbuf[g & 1] + r * 16)});
      acc[r] = fmadd(fmul(s, fbroadcast(d[r * groups + g])), sum, acc[r]);
      acc[r] = fmadd(m, fbroadcast(xs[r * groups + g]), acc[r]);
    }
  };
  const uint8_t* wb = w;
  unpack_group(wb, G, prefetch, bbuf[0]);
  for (int64_t g = 0; g < groups; ++g) {
    if (g + 1 < groups) unpack_group(wb, G, prefetch, bbuf[(g + 1) & 1]);
    if (g & 1) group_sums_1(a + g * G, bbuf[1], K, G, kstep, cbuf[1]);
    else group_sums_0(a + g * G, bbuf[0], K, G, kstep, cbuf[0]);
    if (g > 0) to_floats(g - 1);
  }
  to_floats(groups - 1);
  for (int r = 0; r < rb; ++r) fstore(out + r * kTileN, acc[r]);
}

}  // namespace amx
}  // namespace QWENVL_ISA_NS
