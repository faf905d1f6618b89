"""The int8 decode kernel at several software-prefetch distances, against a read-only pass over the same bytes.

    .venv/bin/python bench/int8_prefetch.py [--distances 0 1024 2048 4096] [--rows 1 8] [--layers 8]
                                            [--rounds 7] [--pages huge] [--hot]        # ~1 min

Why: qwenvl/kernels/csrc/int8_kernel.hpp asks for the weights QWENVL_INT8_PREFETCH_BYTES ahead of its
reads; this is how that distance was chosen and how to check it on another machine. The kernel's own
header (AVX-512 build) is compiled once per distance into its own namespace, all linked into one program
(bench/csrc/int8_prefetch_ab.cpp) that times them in alternating rounds over a decode step's matrices at
Qwen2-VL-2B widths (`--layers` distinct copies; 8: 374 MB), split over OpenMP threads as int8_matmul splits
them, beside a read-only SIMD pass over the same tiles (the ceiling). No torch in the timed program: this
measures the kernel alone, not the Python call around it (bench/int8_read_ceiling.py does that).
`--hot`: one 1.5 MB matrix over and over instead, so the kernel's arithmetic rather than memory.
OMP_NUM_THREADS picks the threads (default: all cores).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "qwenvl" / "kernels" / "csrc"
DRIVER = Path(__file__).resolve().parent / "csrc" / "int8_prefetch_ab.cpp"
TARGET = "avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c"     # int8_avx512.cpp's


def build(distances: list[int], folder: Path) -> Path:
    objects = []
    decls = ['#pragma once\n#include "kernels.hpp"\n']
    table = []
    for dist in distances:
        ns = f"pf_{dist}"
        src = folder / f"{ns}.cpp"
        src.write_text(f'#include <cstdint>\n#include <cstring>\n#pragma GCC target("{TARGET}")\n'
                       f'#define QWENVL_ISA_NS {ns}\n#define QWENVL_INT8_PREFETCH_BYTES {dist}\n'
                       '#include "cpu_types_avx512.hpp"\n#include "int8_kernel.hpp"\n')
        obj = folder / f"{ns}.o"
        subprocess.run(["g++", "-O3", "-std=c++17", "-ffp-contract=off", "-fopenmp", f"-I{CSRC}", "-c", str(src),
                        "-o", str(obj)], check=True)
        objects.append(obj)
        decls.append(f"namespace {ns} {{ void int8_matmul_tiles(const qwenvl_kernels::Int8MatmulArgs&, int64_t, "
                     f"int64_t); void activation_block_sums(const int8_t*, int64_t, int64_t, int32_t*); }}\n")
        table.append(f'{{"prefetch {dist}", {dist}, {ns}::int8_matmul_tiles, {ns}::activation_block_sums}}')
    decls.append("struct Variant { const char* name; int distance;\n"
                 "  void (*matmul)(const qwenvl_kernels::Int8MatmulArgs&, int64_t, int64_t);\n"
                 "  void (*block_sums)(const int8_t*, int64_t, int64_t, int32_t*); };\n"
                 f"static const Variant kVariants[] = {{{', '.join(table)}}};\n"
                 f"static const int kNumVariants = {len(distances)};\n")
    (folder / "variants.h").write_text("".join(decls))
    exe = folder / "int8_prefetch_ab"
    subprocess.run(["g++", "-O3", "-std=c++17", "-fopenmp", f"-I{CSRC}", f"-I{folder}", str(DRIVER),
                    *map(str, objects), "-o", str(exe)], check=True)
    return exe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--distances", type=int, nargs="+", default=[0, 1024, 2048, 4096],
                        help="prefetch distances in bytes (0: none, the kernel before prefetching)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="activation rows (1..16)")
    parser.add_argument("--layers", type=int, default=8, help="distinct copies of a layer's four matrices")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--pages", choices=("huge", "small"), default="huge")
    parser.add_argument("--hot", action="store_true", help="one L2-sized matrix over and over")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qwenvl_int8_prefetch_") as tmp:
        exe = build(args.distances, Path(tmp))
        kinds = ["read"] + [f"prefetch {d}:{r}" for r in args.rows for d in args.distances]
        layers = -200 if args.hot else args.layers
        out = subprocess.run([str(exe), str(layers), "1" if args.pages == "huge" else "0", str(args.rounds),
                              *kinds], env=os.environ, capture_output=True, text=True)
        sys.stdout.write(out.stdout)
        sys.stderr.write(out.stderr)


if __name__ == "__main__":
    main()
