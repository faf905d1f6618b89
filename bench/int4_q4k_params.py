"""The int4 kernel's three forms of group parameters, timed on the same cold matrices: does Q4_K's compact
super-block form pay?

    .venv/bin/python bench/int4_q4k_params.py [--rounds 5]       # Qwen2-VL-2B's gate/up and down (~1-2 min)

A GGUF's Q4_K tensor (d, dmin fp16 per 256 weights, 6-bit sc, m per 32) loads exactly into the int4 tile
layout with groups of 32 in three ways, against qwenvl's own int4 (groups of 128, bfloat16 parameters):
  - super-blocks  Int4Linear.from_q4_k: the file's d, -dmin (fp16) and sc, m (a byte each); the kernel forms
                  scale = d * sc and min = -dmin * m in float32 (exact)         4 + 0.625 bits a weight
  - float32       the products stored per group of 32 (scale, min) in float32   4 + 2 bits (exact)
  - bfloat16      the same rounded to bfloat16 (what the loader did for a bfloat16 model before the
                  super-block form: not exact)                                  4 + 1 bits
  - ours G=128    Int4Linear.from_weight(w, 128): bfloat16 (scale, min) per 128  4 + 0.25 bits
Each kind multiplies bf16 rows (1 and 8) by enough distinct matrices (>= 256 MB) that none is served from
the cache, in alternating rounds (medians; each round the best of 5 passes), reported in ms, in GB/s of the
bytes the kernel reads, and as time relative to ours G=128. The machine may be shared: rerun quietly.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from int8_layouts import COLD_BYTES, best_seconds  # noqa: E402  (cold timing over distinct matrices)

SHAPES = {"gate/up_proj": (8960, 1536), "down_proj": (1536, 8960)}
ROWS = (1, 8)


def _q4_k_fields(n: int, k: int, g: torch.Generator):
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    d = (torch.rand(n, k // 256, generator=g) * 1e-3).half()
    neg_dmin = (-torch.rand(n, k // 256, generator=g) * 1e-3).half()
    sc = torch.randint(0, 64, (n, k // 32), dtype=torch.uint8, generator=g)
    m = torch.randint(0, 64, (n, k // 32), dtype=torch.uint8, generator=g)
    return q, d, neg_dmin, sc, m


def _products(q, d, neg_dmin, sc, m):
    n = q.shape[0]
    return ((d.float()[..., None] * sc.float().view(n, -1, 8)).view(n, -1),
            (neg_dmin.float()[..., None] * m.float().view(n, -1, 8)).view(n, -1))


def make(kind: str, n: int, k: int, g: torch.Generator):
    from qwenvl.layers.quantized_linear import LAYOUT_TILES, Int4Linear
    if kind == "ours G=128":
        return Int4Linear.from_weight(torch.randn(n, k, generator=g).to(torch.bfloat16) * 0.02, 128, None,
                                      layout=LAYOUT_TILES)
    fields = _q4_k_fields(n, k, g)
    if kind == "super-blocks":
        return Int4Linear.from_q4_k(*fields, None, torch.bfloat16, layout=LAYOUT_TILES)
    scales, mins = _products(*fields)
    dtype = torch.float32 if kind == "float32" else torch.bfloat16
    return Int4Linear.from_scales_and_mins(fields[0], scales.to(dtype), mins.to(dtype), 32, None,
                                           layout=LAYOUT_TILES, dtype=torch.bfloat16)


KINDS = ("super-blocks", "float32", "bfloat16", "ours G=128")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    from qwenvl import kernels
    if kernels.isa() is None:
        sys.exit("qwenvl's kernels do not run here (QWENVL_KERNELS or the build): nothing to compare")
    torch.backends.mkldnn.enabled = False
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, qwenvl kernels: {kernels.isa()}")
    g = torch.Generator().manual_seed(0)
    for name in args.shapes:
        n, k = SHAPES[name]
        xs = {rows: torch.randn(rows, k, dtype=torch.bfloat16) for rows in ROWS}
        built = {}
        for kind in KINDS:
            first = make(kind, n, k, g)
            nbytes = first.packed.nbytes + first.group_params.nbytes
            built[kind] = ([first] + [make(kind, n, k, g) for _ in range(max(2, COLD_BYTES // nbytes) - 1)], nbytes)
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):
            for kind, (layers, _) in built.items():
                for rows, x in xs.items():
                    times.setdefault((kind, rows), []).append(best_seconds([lambda l=l: l(x) for l in layers]))
        for rows in ROWS:
            base = statistics.median(times[("ours G=128", rows)])
            for kind in KINDS:
                s, nbytes = statistics.median(times[(kind, rows)]), built[kind][1]
                bits = 8 * nbytes / (n * k)
                print(f"   {name:13s} rows {rows} {kind:13s} {bits:5.3f} bits/w {s * 1e3:7.3f} ms "
                      f"{nbytes / s / 1e9:6.1f} GB/s  time {s / base:5.2f}x ours G=128", flush=True)
        del built


if __name__ == "__main__":
    main()
