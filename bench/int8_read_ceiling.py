"""The int8 decode product's cold reads against what this machine can stream through the same threads.

    .venv/bin/python bench/int8_read_ceiling.py [--layers 8] [--rounds 7] [--pages both]   # ~1-2 min

Why: the int8 kernel (qwenvl/kernels/csrc/int8_kernel.hpp) is not bound by its arithmetic for one row (it
reads ~80 GB/s per core from L2), so a decode step's products run at whatever rate memory gives a kernel
that reads the tiles in its order. The copy bandwidth (bench/throughput.py) counts a write too and runs on
other threads in another order, so it is no fair bar; this script builds one: a C++ read-only kernel that
sums every byte of the same tiles with SIMD loads, split over torch's threads exactly as int8_matmul splits
them (at::parallel_for over 16-row tiles, the same grain), compiled here with torch.utils.cpp_extension
(~1 min the first time). Every number is then printed as a fraction of that read ceiling.

The matrices are a decode step's int8 layers at Qwen2-VL-2B widths (q/k/v fused 2048 x 1536, o 1536 x
1536, gate/up fused 17920 x 1536, down 1536 x 8960), `--layers` distinct copies (8: 374 MB, more than a
VM's share of the cache), called in a step's order through Int8Linear as the model calls it; each kind is
timed over all of them in alternating rounds (the machine may be shared: medians of rounds, each round the
best of 3 passes). `--pages` compares the tiles on 2 MiB pages (qwenvl/kernels/weight_memory.py, what the
layers get now) with the same bytes copied onto 4 KiB pages.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (copy bandwidth)

SHAPES = {"q/k/v": (2048, 1536), "o": (1536, 1536), "gate/up": (17920, 1536), "down": (1536, 8960)}

_READ_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <atomic>

#include "read_pass.hpp"

// The AVX-512 read pass is bench/csrc/read_pass.hpp's (the C++ drivers' ceiling too); an AVX2 one beside it:
// four independent 32-byte loads per step, no arithmetic worth the name.
__attribute__((target("avx2"))) static int64_t sum_avx2(const int8_t* p, const int8_t* e) {
  __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
  for (; p + 128 <= e; p += 128) {
    s0 = _mm256_add_epi32(s0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    s1 = _mm256_add_epi32(s1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
    s2 = _mm256_add_epi32(s2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64)));
    s3 = _mm256_add_epi32(s3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 96)));
  }
  alignas(32) int32_t lanes[8];
  const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(s0, s1), _mm256_add_epi32(s2, s3));
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), sum);
  int64_t s = 0;
  for (int i = 0; i < 8; ++i) s += lanes[i];
  return s;
}

// tiles int8 [T, K/4, 16, 4] as int8_matmul gets them: the same split over threads (bindings.cpp).
int64_t read_tiles(const torch::Tensor& tiles) {
  const int64_t T = tiles.size(0), tile_bytes = tiles.size(1) * 64;
  const int8_t* w = tiles.data_ptr<int8_t>();
  const bool avx512 = __builtin_cpu_supports("avx512f");
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / tile_bytes);
  std::atomic<int64_t> total{0};
  at::parallel_for(0, T, grain, [&](int64_t begin, int64_t end) {
    const int8_t* p = w + begin * tile_bytes;
    const int8_t* e = w + end * tile_bytes;
    total += avx512 ? bench::read_bytes(p, e) : sum_avx2(p, e);
  });
  return total.load();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("read_tiles", &read_tiles, "sum of a tile array's bytes, read as int8_matmul splits it",
        py::call_guard<py::gil_scoped_release>());
}
"""


def read_kernel():
    from torch.utils import cpp_extension
    t0 = time.perf_counter()
    module = cpp_extension.load_inline("qwenvl_bench_read_ceiling", cpp_sources=[_READ_SOURCE],
                                       extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                                       extra_include_paths=[str(Path(__file__).resolve().parent / "csrc")])
    print(f"read kernel built/loaded in {time.perf_counter() - t0:.1f} s")
    return module


def make_layers(layers: int, small_pages: bool):
    """A decode step's int8 layers, `layers` times over, in tile layout; on 4 KiB pages if asked."""
    from qwenvl.layers.quantized_linear import Int8Linear
    out = []
    for _ in range(layers):
        for out_f, in_f in SHAPES.values():
            q = torch.randint(-127, 128, (out_f, in_f), dtype=torch.int8)
            layer = Int8Linear.from_int8(q, torch.rand(out_f) * 1e-3, None)
            layer.use_tile_layout()
            if small_pages:
                layer.tiles = torch.empty_like(layer.tiles, memory_format=torch.contiguous_format).copy_(layer.tiles)
            out.append(layer)
    return out


def best_pass(call, passes: int = 3) -> float:
    call()
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="distinct copies of a layer's four matrices")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds over the kinds (medians)")
    parser.add_argument("--pages", choices=("huge", "small", "both"), default="both",
                        help="tiles on 2 MiB pages (as the layers allocate them), copied onto 4 KiB ones, or both")
    args = parser.parse_args()
    from qwenvl import kernels
    from qwenvl.kernels import weight_memory
    if kernels.isa() is None:
        sys.exit("qwenvl's kernels do not run here (QWENVL_KERNELS or the build): nothing to measure")
    reader = read_kernel()
    bandwidth = throughput.copy_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, qwenvl kernels: {kernels.isa()}, "
          f"huge pages: {'madvise' if weight_memory.available() else 'unavailable'}; "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    pages = {"huge": [False], "small": [True], "both": [False, True]}[args.pages]
    sets = {small: make_layers(args.layers, small) for small in pages}
    nbytes = sum(layer.tiles.numel() for layer in sets[pages[0]])
    hp = sum(weight_memory.huge_page_bytes(layer.tiles) for layer in sets[pages[0]])
    print(f"{len(sets[pages[0]])} matrices, {nbytes / 1e6:.0f} MB of tiles per set; "
          f"{hp / max(nbytes, 1):.0%} of the first set on huge pages (/proc/self/smaps)")
    xs = {rows: torch.randn(rows, max(in_f for _, in_f in SHAPES.values()), dtype=torch.bfloat16) for rows in (1, 8)}

    def step(layers, rows):
        return lambda: [layer(xs[rows][:, :layer.in_features]) for layer in layers]

    kinds = {}
    for small in pages:
        tag = "4 KiB" if small else "2 MiB"
        layers = sets[small]
        kinds[(tag, "read ceiling")] = lambda layers=layers: [reader.read_tiles(layer.tiles) for layer in layers]
        kinds[(tag, "int8 kernel, 1 row")] = step(layers, 1)
        kinds[(tag, "int8 kernel, 8 rows")] = step(layers, 8)
    times: dict = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for kind, call in kinds.items():
            times[kind].append(best_pass(call))
    print(f"ms per pass over all matrices (median of {args.rounds} alternating rounds, each the best of 3), "
          "GB/s of tile bytes, fraction of the read ceiling on the same pages")
    for (tag, name), ts in times.items():
        s = statistics.median(ts)
        ceiling = statistics.median(times[(tag, "read ceiling")])
        print(f"   {tag} pages  {name:22s} {s * 1e3:8.2f} ms {nbytes / s / 1e9:6.1f} GB/s "
              f"{ceiling / s:5.0%} of ceiling   (best round {nbytes / min(ts) / 1e9:5.1f} GB/s)")
    for small in pages:
        tag = "4 KiB" if small else "2 MiB"
        one = statistics.median(times[(tag, "int8 kernel, 1 row")])
        eight = statistics.median(times[(tag, "int8 kernel, 8 rows")])
        print(f"   {tag} pages  8-row / 1-row time: {eight / one:.2f}x")


if __name__ == "__main__":
    main()
