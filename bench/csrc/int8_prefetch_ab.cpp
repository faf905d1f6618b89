// The driver of bench/int8_prefetch.py (which compiles it, see there): the int8 kernel built at several
// software-prefetch distances (each its own namespace, declared in variants.h by the script), timed in
// alternating rounds over a decode step's matrices beside a read-only pass over the same bytes.
// Threads: OpenMP, each product split over contiguous ranges of tiles exactly as at::parallel_for splits
// int8_matmul's (bindings.cpp: the same grain).
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "read_pass.hpp"   // bench::filled_pages, bench::read_bytes
#include "variants.h"   // kVariants[]: {name, distance, matmul, block_sums}

namespace {

struct Matrix { int64_t N, K; int8_t* w; std::vector<float> scales; };
struct Kind { int variant; int rows; std::vector<double> seconds; };   // variant -1: the read pass

}  // namespace

// args: layers huge rounds kind... ; a kind is "read" or "<variant name>:<rows>"; layers < 0: one
// 1024 x 1536 matrix (1.5 MB, hot in L2) -layers times over, the kernel's arithmetic alone.
int main(int argc, char** argv) {
  if (argc < 5) { fprintf(stderr, "usage: %s layers huge rounds kind...\n", argv[0]); return 2; }
  const int layers = atoi(argv[1]), rounds = atoi(argv[3]);
  const bool huge = atoi(argv[2]);
  const int64_t shapes[4][2] = {{2048, 1536}, {1536, 1536}, {17920, 1536}, {1536, 8960}};
  std::vector<Matrix> mats;
  if (layers > 0) {
    for (int l = 0; l < layers; ++l)
      for (auto& s : shapes)
        mats.push_back({s[0], s[1], reinterpret_cast<int8_t*>(bench::filled_pages(s[0] * s[1], huge)),
                        std::vector<float>(s[0], 1.f)});
  } else {
    int8_t* w = reinterpret_cast<int8_t*>(bench::filled_pages(1024 * 1536, huge));
    for (int i = 0; i < -layers; ++i) mats.push_back({1024, 1536, w, std::vector<float>(1024, 1.f)});
  }
  double total = 0;
  for (auto& m : mats) total += double(m.N) * m.K;
  std::vector<Kind> kinds;
  for (int i = 4; i < argc; ++i) {
    std::string k = argv[i];
    if (k == "read") { kinds.push_back({-1, 1, {}}); continue; }
    const auto colon = k.find(':');
    const std::string name = k.substr(0, colon);
    int v = -1;
    for (int j = 0; j < kNumVariants; ++j) if (name == kVariants[j].name) v = j;
    if (v < 0 || colon == std::string::npos) { fprintf(stderr, "unknown kind %s\n", k.c_str()); return 2; }
    kinds.push_back({v, atoi(k.c_str() + colon + 1), {}});
  }
  const int64_t kmax = 8960;
  std::vector<int8_t> a(16 * kmax);
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<int8_t>(int(i * 7 % 255) - 127);
  std::vector<float> d(16 * kmax / 32, 0.01f), xs(16 * kmax / 32, 0.f), y(16 * 17920);
  std::vector<int32_t> sums(16 * kmax / 32);
  volatile int64_t sink = 0;
  for (int r = 0; r <= rounds; ++r) {          // round 0 warms up
    for (auto& kind : kinds) {
      const auto t0 = std::chrono::steady_clock::now();
      for (auto& m : mats) {
        const int64_t tiles = m.N / 16, tile_bytes = m.K * 16;
        qwenvl_kernels::Int8MatmulArgs args{{a.data(), d.data(), xs.data(), 1}, sums.data(), m.w, m.scales.data(),
                                            nullptr, y.data(), false, kind.rows, m.K, m.N};
        if (kind.variant >= 0) kVariants[kind.variant].block_sums(a.data(), kind.rows, m.K, sums.data());
        const int64_t grain = std::max<int64_t>(1, (64 << 10) / tile_bytes);
        const int threads = int(std::min<int64_t>(omp_get_max_threads(), (tiles + grain - 1) / grain));
#pragma omp parallel num_threads(threads)
        {
          const int64_t chunk = (tiles + threads - 1) / threads, b = omp_get_thread_num() * chunk;
          const int64_t e = std::min(tiles, b + chunk);
          if (b < e) {
            if (kind.variant < 0) sink += bench::read_bytes(m.w + b * tile_bytes, m.w + e * tile_bytes);
            else kVariants[kind.variant].matmul(args, b, e);
          }
        }
      }
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (r > 0) kind.seconds.push_back(s);
    }
  }
  printf("%.0f MB of int8 tiles, %s pages, %d threads, %d alternating rounds; ms per pass, GB/s of tile bytes\n",
         total / 1e6, huge ? "2 MiB" : "4 KiB", omp_get_max_threads(), rounds);
  double read_median = 0;
  for (auto& kind : kinds)
    if (kind.variant < 0) { auto t = kind.seconds; std::sort(t.begin(), t.end()); read_median = t[t.size() / 2]; }
  for (auto& kind : kinds) {
    auto t = kind.seconds;
    std::sort(t.begin(), t.end());
    const double med = t[t.size() / 2];
    const std::string name = kind.variant < 0 ? "read ceiling" : std::string(kVariants[kind.variant].name) +
                                                                     ", " + std::to_string(kind.rows) + " rows";
    printf("   %-28s median %8.2f ms %6.1f GB/s", name.c_str(), med * 1e3, total / med / 1e9);
    if (read_median > 0) printf("  %4.0f%% of ceiling", 100 * read_median / med);
    printf("   best %6.1f GB/s\n", total / t[0] / 1e9);
  }
}
