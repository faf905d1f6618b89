"""Decode cost of sparsity: a Qwen3-VL-30B-A3B-shaped MoE (random bf16) against its dense twin, whose MLP is
as wide as the k active experts together (same attention, widths, vocabulary). Targets: MoE batch-1 decode
>= 0.6x the twin's in bf16 (issue 25), >= 0.9x in int4 (issue 36: every expert through the int4 kernel), i.e.
sparsity costs routing, not reading every expert.

    .venv/bin/python bench/moe_vs_dense.py --layers 4                      # bf16; ~5 GiB of checkpoints in /tmp
    .venv/bin/python bench/moe_vs_dense.py --layers 4 --quantization int4  # both quantised to int4 at load

Both load in bf16 (or quantised at load) and decode the same number of greedy steps after a 16-token prompt;
the MoE model reads 8 of 128 experts per token, so both read about the same bytes per token.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_load import run  # noqa: E402


def build(out: Path, layers: int, dense: bool) -> None:
    cmd = [sys.executable, str(Path(__file__).with_name("moe_load.py")), "--build-only", "--layers", str(layers),
           "--dir", str(out)] + (["--dense-twin"] if dense else [])
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/qwenvl_moe_vs_dense"))
    ap.add_argument("--quantization", default="", choices=("", "int8", "int4"), help="quantise both at load")
    args = ap.parse_args()
    results = {}
    try:
        for name, dense in (("moe", False), ("dense twin", True)):
            path = args.dir / name.replace(" ", "_")
            t0 = time.perf_counter()
            build(path, args.layers, dense)
            print(f"built {name}: {args.layers} layers in {time.perf_counter() - t0:.0f} s", flush=True)
            results[name] = run(path, args.steps, quantization=args.quantization)
            shutil.rmtree(path, ignore_errors=True)
            r = results[name]
            print(f"{name:>10}: decode {r['tok_s']:.2f} tok/s, model {r['model_gib']:.2f} GiB, load {r['load_s']:.1f} s",
                  flush=True)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)
    ratio = results["moe"]["tok_s"] / results["dense twin"]["tok_s"]
    target = 0.9 if args.quantization == "int4" else 0.6
    print(f"MoE / dense-twin decode, {args.quantization or 'bf16'}: {ratio:.2f}x (target >= {target}: "
          f"{'met' if ratio >= target else 'below target'}); threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
