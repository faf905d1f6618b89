// The driver of bench/int4_variants.py (which compiles it, see there): builds of the int4 kernel (each its
// own namespace, declared in variants.h by the script: the kernel of a git revision or of the working tree),
// timed in alternating rounds over a decode step's int4 matrices beside a read-only pass over the same bytes.
// Threads: OpenMP, each product split over contiguous ranges of tiles as bindings.cpp's at::parallel_for
// splits int4_matmul's (the same grain).
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "read_pass.hpp"   // bench::filled_pages, bench::read_bytes
#include "variants.h"   // kVariants[]: {name, matmul, quantize}

namespace {

constexpr int64_t kTileN = 16, kGroup = 128;

struct Matrix { int64_t N, K; uint8_t* w; uint16_t* params; };       // bf16 params, as qwenvl's quantiser's
struct Kind { int variant; int rows; std::vector<double> seconds, cpu; };   // variant -1: the read pass

double thread_cpu_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

}  // namespace

// args: layers head rounds kind... ; a kind is "read" or "<variant name>:<rows>"; layers < 0: one 1024 x 1536
// matrix (768 KB, hot in L2) -layers times over, the kernel's arithmetic alone; layers "NxK": distinct N x K
// matrices, 600 MB of them, instead of a step's; head 1: a 151936 x 1536 head after the layers.
int main(int argc, char** argv) {
  if (argc < 5) { fprintf(stderr, "usage: %s layers head rounds kind...\n", argv[0]); return 2; }
  const int layers = atoi(argv[1]), head = atoi(argv[2]), rounds = atoi(argv[3]);
  const int64_t shapes[4][2] = {{2048, 1536}, {1536, 1536}, {17920, 1536}, {1536, 8960}};
  std::vector<Matrix> mats;
  auto add = [&](int64_t N, int64_t K) {
    const int64_t tiles = (N + kTileN - 1) / kTileN;
    mats.push_back({N, K, bench::filled_pages(tiles * kTileN * K / 2),
                    reinterpret_cast<uint16_t*>(bench::filled_pages(tiles * (K / kGroup) * 2 * kTileN * 2))});
    // params: bf16 values near 0.01 (scales) / -0.08 (mins), never NaN
    uint16_t* p = mats.back().params;
    for (int64_t i = 0; i < tiles * (K / kGroup) * 2 * kTileN; ++i) p[i] = (i / kTileN) % 2 ? 0xbda3 : 0x3c23;
  };
  if (std::string(argv[1]).find('x') != std::string::npos) {   // "NxK": one shape, copies of >= 600 MB
    const int64_t N = atoll(argv[1]), K = atoll(std::string(argv[1]).substr(std::string(argv[1]).find('x') + 1).c_str());
    for (int64_t bytes = 0; bytes < (600 << 20); bytes += N * K / 2) add(N, K);
  } else if (layers > 0) {
    for (int l = 0; l < layers; ++l)
      for (auto& s : shapes) add(s[0], s[1]);
  } else {
    add(1024, 1536);
    for (int i = 1; i < -layers; ++i) mats.push_back(mats[0]);
  }
  if (head) add(151936, 1536);
  double total = 0;
  for (auto& m : mats) {
    const int64_t tiles = (m.N + kTileN - 1) / kTileN;
    total += double(tiles) * kTileN * m.K / 2 + double(tiles) * (m.K / kGroup) * 2 * kTileN * 2;
  }
  std::vector<Kind> kinds;
  for (int i = 4; i < argc; ++i) {
    std::string k = argv[i];
    if (k == "read") { kinds.push_back({-1, 1, {}, {}}); continue; }
    const auto colon = k.rfind(':');
    const std::string name = k.substr(0, colon);
    int v = -1;
    for (int j = 0; j < kNumVariants; ++j) if (name == kVariants[j].name) v = j;
    if (v < 0 || colon == std::string::npos) { fprintf(stderr, "unknown kind %s\n", k.c_str()); return 2; }
    kinds.push_back({v, atoi(k.c_str() + colon + 1), {}, {}});
  }
  const int64_t kmax = 8960;
  std::vector<float> x(16 * kmax);
  for (size_t i = 0; i < x.size(); ++i) x[i] = float(int(i * 7 % 255) - 127) / 64.0f;
  std::vector<int8_t> a(16 * kmax);
  std::vector<float> d(16 * kmax / kGroup), xs(16 * kmax / kGroup), y(16 * 151936);
  volatile int64_t sink = 0;
  for (int r = 0; r <= rounds; ++r) {          // round 0 warms up
    for (auto& kind : kinds) {
      const auto t0 = std::chrono::steady_clock::now();
      double cpu = 0;
      for (auto& m : mats) {
        const int64_t tiles = (m.N + kTileN - 1) / kTileN, tile_bytes = m.K * kTileN / 2;
        const int64_t param_bytes = (m.K / kGroup) * 2 * kTileN * 2;
        if (kind.variant >= 0)      // as int4_matmul does it: the activations quantised on the calling thread
          kVariants[kind.variant].quantize(x.data(), false, kind.rows, m.K, kGroup, 1, a.data(), d.data(),
                                           xs.data());
        qwenvl_kernels::Int4MatmulArgs args{{a.data(), d.data(), xs.data(), 1}, m.w, m.params,
                                            qwenvl_kernels::Int4Params::kBfloat16, y.data(), false,
                                            kind.rows, m.K, kGroup, m.N};
        const int64_t grain = std::max<int64_t>(1, (64 << 10) / tile_bytes);
        const int threads = int(std::min<int64_t>(omp_get_max_threads(), (tiles + grain - 1) / grain));
#pragma omp parallel num_threads(threads)
        {
          const int64_t chunk = (tiles + threads - 1) / threads, b = omp_get_thread_num() * chunk;
          const int64_t e = std::min(tiles, b + chunk);
          if (b < e) {
            const double c0 = thread_cpu_seconds();
            if (kind.variant < 0) {
              sink += bench::read_bytes(m.w + b * tile_bytes, m.w + e * tile_bytes);
              const uint8_t* pp = reinterpret_cast<const uint8_t*>(m.params);
              sink += bench::read_bytes(pp + b * param_bytes, pp + e * param_bytes);
            } else {
              kVariants[kind.variant].matmul(args, b, e);
            }
            const double c = thread_cpu_seconds() - c0;
#pragma omp atomic
            cpu += c;
          }
        }
      }
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (r > 0) { kind.seconds.push_back(s); kind.cpu.push_back(cpu); }
    }
  }
  printf("%.0f MB of int4 tiles + bf16 group params (G %d), %d threads, %d alternating rounds; "
         "ms per pass over all, GB/s of those bytes\n", total / 1e6, int(kGroup), omp_get_max_threads(), rounds);
  double read_median = 0;
  std::vector<double> one_row(kNumVariants, 0), one_row_cpu(kNumVariants, 0);
  for (auto& kind : kinds) {
    auto t = kind.seconds, c = kind.cpu;
    std::sort(t.begin(), t.end());
    std::sort(c.begin(), c.end());
    if (kind.variant < 0) read_median = t[t.size() / 2];
    else if (kind.rows == 1) one_row[kind.variant] = t[t.size() / 2], one_row_cpu[kind.variant] = c[c.size() / 2];
  }
  for (auto& kind : kinds) {
    auto t = kind.seconds;
    std::sort(t.begin(), t.end());
    const double med = t[t.size() / 2];
    const std::string name = kind.variant < 0 ? "read ceiling" : std::string(kVariants[kind.variant].name) +
                                                                     ", " + std::to_string(kind.rows) + " rows";
    printf("   %-30s median %8.2f ms %6.1f GB/s", name.c_str(), med * 1e3, total / med / 1e9);
    if (read_median > 0) printf("  %4.0f%% of ceiling", 100 * read_median / med);
    printf("   best %6.1f GB/s", total / t[0] / 1e9);
    auto c = kind.cpu;                     // CPU time in the kernel, summed over threads: what the sharing
    std::sort(c.begin(), c.end());         // of the cores by other processes changes least
    printf("   cpu %8.2f ms = %5.1f GB/s a core", c[c.size() / 2] * 1e3, total / c[c.size() / 2] / 1e9);
    if (kind.variant >= 0 && kind.rows > 1 && one_row[kind.variant] > 0)
      printf("   %d-row / 1-row %.2fx (cpu %.2fx)", kind.rows, med / one_row[kind.variant],
             c[c.size() / 2] / one_row_cpu[kind.variant]);
    printf("\n");
  }
}
