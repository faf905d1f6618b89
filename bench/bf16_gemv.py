"""The bf16 decode product: qwenvl's kernel (qwenvl/kernels/csrc/bf16_kernel.hpp, AVX-512 BF16 and AVX2
builds) against PyTorch's F.linear on the same weights, with the copy bandwidth measured in the same run.

    .venv/bin/python bench/bf16_gemv.py                    # Qwen2-VL-2B shapes, 1, 4, 8 and 16 rows (~2 min)
    .venv/bin/python bench/bf16_gemv.py --rows 1 --rounds 5

Why: bf16 decode reads every weight once per token, so the product's read speed is the decode speed. F.linear
runs as the engine runs it: oneDNN off for one row (the runner's choice, PyTorch's own matrix-vector kernel
is faster there), on from two rows. Each kind is timed over enough distinct matrices (>= 256 MB) that none
is served from the cache; the kinds take turns in every round (a shared machine's drift hits them alike)
and each cell is the median over rounds of a round's best pass, in ms, GB/s and as a fraction of the copy
bandwidth (read + write).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (copy bandwidth)
from int8_layouts import COLD_BYTES, best_seconds  # noqa: E402  (cold timing over distinct matrices)

SHAPES = {"q/o_proj": (1536, 1536), "qkv fused": (2048, 1536), "gate/up fused": (17920, 1536),
          "down_proj": (1536, 8960), "output head": (151936, 1536)}


def products(isas: list[str]) -> dict:
    from qwenvl import kernels
    kinds = {"F.linear": lambda x, w: F.linear(x, w)}
    for isa in isas:
        kinds[f"ours {isa}"] = lambda x, w, isa=isa: kernels.bf16_matmul(x, w, None, isa_name=isa)
    return kinds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,4,8,16", help="activation rows per product, comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shapes", default=",".join(SHAPES), help="which of: " + ", ".join(SHAPES))
    a = p.parse_args()
    from qwenvl import kernels
    isas = [i for i in (kernels.bf16_isa(), "avx2") if i] if kernels.available() else []
    isas = list(dict.fromkeys(isas))
    copy_bw = throughput.copy_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, qwenvl bf16 kernel {isas or 'unavailable'}; "
          f"copy bandwidth {copy_bw / 1e9:.1f} GB/s (read + write)")
    kinds = products(isas)
    print(f"median of {a.rounds} rounds: ms per matrix, GB/s, fraction of the copy bandwidth")
    print(f"   {'layer':14s} {'rows':>4s} " + " ".join(f"{k:>24s}" for k in kinds) + "   ours / F.linear")
    for name in a.shapes.split(","):
        out_f, in_f = SHAPES[name]
        weights = [torch.randn(out_f, in_f, dtype=torch.bfloat16) for _ in range(max(1, COLD_BYTES // (2 * out_f * in_f)))]
        for rows in [int(r) for r in a.rows.split(",")]:
            x = torch.randn(rows, in_f, dtype=torch.bfloat16)
            times = {k: [] for k in kinds}
            for _ in range(a.rounds):
                for kind, fn in kinds.items():
                    torch.backends.mkldnn.enabled = rows > 1 or kind != "F.linear"
                    times[kind].append(best_seconds([lambda w=w, fn=fn: fn(x, w) for w in weights], repeats=2))
            torch.backends.mkldnn.enabled = True
            med = {k: statistics.median(v) for k, v in times.items()}
            nbytes = 2 * out_f * in_f
            cells = [f"{t * 1e3:9.3f} {nbytes / t / 1e9:6.1f} GB/s {nbytes / t / copy_bw:4.0%}" for t in med.values()]
            ratio = " ".join(f"{med['F.linear'] / med[k]:.2f}x" for k in kinds if k != "F.linear")
            print(f"   {name:14s} {rows:4d} " + " ".join(cells) + f"   {ratio}", flush=True)
        del weights


if __name__ == "__main__":
    main()
