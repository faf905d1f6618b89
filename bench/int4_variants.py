"""Builds of the int4 decode kernel side by side (a git revision's against the working tree's), against a
read-only pass over the same bytes.

    .venv/bin/python bench/int4_variants.py [--variants before=514e0ed after=worktree] [--rows 1 8]
                                            [--layers 28] [--head] [--rounds 7] [--hot]     # ~1-2 min
    OMP_NUM_THREADS=1 .venv/bin/python bench/int4_variants.py ...                          # one thread

Why: issue 36 wants the int4 product to read its (half as many) bytes as fast as the int8 one reads its
own, and that is a question of the kernel alone. A variant is `name=REV` (qwenvl/kernels/csrc of that git
revision, `worktree` for the files as they are) with optional `,MACRO=VALUE` compile definitions (e.g.
`pf0=worktree,QWENVL_INT4_PREFETCH_BYTES=0`). Each variant's int4_kernel.hpp (AVX-512 build, or AVX2 with
`--isa avx2`) is compiled into its own namespace, all linked into one program (bench/csrc/int4_variants_ab.cpp)
that times them in alternating rounds (the machine may be shared: medians of rounds) over a decode step's
int4 matrices at Qwen2-VL-2B widths (q/k/v fused 2048 x 1536, o 1536 x 1536, gate/up fused 17920 x 1536,
down 1536 x 8960; `--layers` distinct copies, 28: a whole step's 655 MB, bf16 group parameters at G = 128;
`--head`: the 151936 x 1536 head too; `--shape 1536x8960`: 600 MB of one shape instead), split over
OpenMP threads as int4_matmul splits them, beside a read-only SIMD pass over the same tiles and parameters (the ceiling). No torch in the timed program: the
kernel alone, with the activations' quantisation per product as int4_matmul does it. `--hot`: one 768 KB
matrix over and over instead (the kernel's arithmetic, not memory).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = Path("qwenvl") / "kernels" / "csrc"
DRIVER = Path(__file__).resolve().parent / "csrc" / "int4_variants_ab.cpp"
TARGETS = {"avx512": ("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,amx-tile,amx-int8",
                      "cpu_types_avx512.hpp", "#define QWENVL_WITH_AMX 1\n"),
           "avx2": ("avx2,fma,f16c", "cpu_types_avx2.hpp", "")}       # as int4_avx512.cpp / int4_avx2.cpp
HEADERS = "".join(f"#include <{h}>\n" for h in ("cpuid.h", "sys/syscall.h", "unistd.h", "cstdint", "cstdlib", "cstring"))


def sources(rev: str, folder: Path) -> Path:
    """qwenvl/kernels/csrc of git revision `rev` (or the working tree's) in a folder of its own."""
    if rev == "worktree":
        return ROOT / CSRC
    out = folder / f"src_{rev.replace('/', '_')}"
    if not out.exists():
        out.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, str(CSRC)], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out / CSRC


def build(variants: list[str], isa: str, folder: Path) -> Path:
    target, types, amx = TARGETS[isa]
    objects, decls, table = [], ['#pragma once\n#include "kernels.hpp"\n'], []
    for i, spec in enumerate(variants):
        name, _, rest = spec.partition("=")
        rev, *macros = (rest or "worktree").split(",")
        ns = f"variant_{i}"
        src = folder / f"{ns}.cpp"
        defines = "".join(f"#define {m.replace('=', ' ', 1)}\n" for m in macros)
        src.write_text(f'{HEADERS}{defines}#pragma GCC target("{target}")\n'
                       f'#define QWENVL_ISA_NS {ns}\n{amx}#include "{types}"\n#include "int4_kernel.hpp"\n')
        obj = folder / f"{ns}.o"
        subprocess.run(["g++", "-O3", "-std=c++17", "-ffp-contract=off", "-fopenmp", f"-I{sources(rev, folder)}",
                        "-c", str(src), "-o", str(obj)], check=True)
        objects.append(obj)
        decls.append(f"namespace {ns} {{ void int4_matmul_tiles(const qwenvl_kernels::Int4MatmulArgs&, int64_t, "
                     f"int64_t); void quantize_activation_blocks(const void*, bool, int64_t, int64_t, int64_t, "
                     f"int64_t, int8_t*, float*, float*); }}\n")
        table.append(f'{{"{name}", {ns}::int4_matmul_tiles, {ns}::quantize_activation_blocks}}')
    decls.append("struct Variant { const char* name;\n"
                 "  void (*matmul)(const qwenvl_kernels::Int4MatmulArgs&, int64_t, int64_t);\n"
                 "  void (*quantize)(const void*, bool, int64_t, int64_t, int64_t, int64_t, int8_t*, float*, float*); };\n"
                 f"static const Variant kVariants[] = {{{', '.join(table)}}};\n"
                 f"static const int kNumVariants = {len(variants)};\n")
    (folder / "variants.h").write_text("".join(decls))
    exe = folder / "int4_variants_ab"
    subprocess.run(["g++", "-O3", "-std=c++17", "-fopenmp", f"-I{ROOT / CSRC}", f"-I{folder}", str(DRIVER),
                    *map(str, objects), "-o", str(exe)], check=True)
    return exe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["before=514e0ed", "after=worktree"],
                        help="name=REV[,MACRO=VALUE...]; REV a git revision or `worktree` (514e0ed: main before issue 36's int4 kernel work)")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="activation rows (1..16)")
    parser.add_argument("--layers", type=int, default=28, help="distinct copies of a layer's four matrices")
    parser.add_argument("--head", action="store_true", help="the 151936 x 1536 head after the layers")
    parser.add_argument("--shape", help="NxK: 600 MB of distinct N x K matrices instead of a step's layers")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--isa", choices=sorted(TARGETS), default="avx512")
    parser.add_argument("--hot", action="store_true", help="one L2-sized matrix over and over")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qwenvl_int4_variants_") as tmp:
        exe = build(args.variants, args.isa, Path(tmp))
        names = [v.partition("=")[0] for v in args.variants]
        kinds = ["read"] + [f"{n}:{r}" for r in args.rows for n in names]
        layers = -400 if args.hot else args.shape or args.layers
        out = subprocess.run([str(exe), str(layers), "1" if args.head else "0", str(args.rounds), *kinds],
                             env=os.environ, capture_output=True, text=True)
        print(f"{args.isa} build", end="; ")
        sys.stdout.write(out.stdout)
        sys.stderr.write(out.stderr)


if __name__ == "__main__":
    main()
