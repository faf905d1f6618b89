// Shared by the bench drivers (int4_variants_ab.cpp, int8_prefetch_ab.cpp) and int8_read_ceiling.py's read
// pass: test bytes laid out as qwenvl/kernels/weight_memory.py lays out a layer's (2 MiB-aligned, on huge pages
// unless asked not to), and the read-only AVX-512 pass over them that the kernels are measured against (the
// ceiling: four independent 64-byte loads a step and no arithmetic worth the name, so it runs at the rate memory
// delivers).
#pragma once
#include <immintrin.h>
#include <sys/mman.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

namespace bench {

// n bytes, 2 MiB-aligned, filled (so every page is resident before timing) with a fixed pseudo-random pattern.
inline uint8_t* filled_pages(size_t n, bool huge = true) {
  const size_t align = 2 << 20, len = (n + align - 1) / align * align;
  void* p = mmap(nullptr, len + align, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) { perror("mmap"); exit(1); }
  uint8_t* q = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(p) + align - 1) / align * align);
  madvise(q, len, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  for (size_t i = 0; i < n; ++i) q[i] = static_cast<uint8_t>((i * 2654435761u) >> 13);
  return q;
}

// The bytes [begin, end) summed as int32 lanes (the sum only keeps the loads from being optimised away).
__attribute__((target("avx512f"), noinline)) inline int64_t read_bytes(const void* begin, const void* end) {
  const uint8_t* p = static_cast<const uint8_t*>(begin);
  const uint8_t* e = static_cast<const uint8_t*>(end);
  __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
  for (; p + 256 <= e; p += 256) {
    s0 = _mm512_add_epi32(s0, _mm512_loadu_si512(p));
    s1 = _mm512_add_epi32(s1, _mm512_loadu_si512(p + 64));
    s2 = _mm512_add_epi32(s2, _mm512_loadu_si512(p + 128));
    s3 = _mm512_add_epi32(s3, _mm512_loadu_si512(p + 192));
  }
  return _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(s0, s1), _mm512_add_epi32(s2, s3)));
}

}  // namespace bench
