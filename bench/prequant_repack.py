"""Direct repack of a pre-quantised AWQ / GPTQ layer into Int4Linear against the round trip it replaces
(dequantise to float, then quantise again with qwenvl's own int4 quantiser), on one Qwen2.5-VL-7B-sized
linear, same process: load time per layer and the weight error each way against what the checkpoint means.

    .venv/bin/python bench/prequant_repack.py                    # mlp.down_proj of the 7B: 18944 -> 3584
    .venv/bin/python bench/prequant_repack.py --in-features 3584 --out-features 18944
"""
from __future__ import annotations

import argparse
import time

import torch

from qwenvl.layers.quantized_linear import Int4Linear, quantize_int4
from qwenvl.checkpoints.quant_formats import awq, gptq


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--in-features", type=int, default=18944)
    ap.add_argument("--out-features", type=int, default=3584)
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(0)
    in_f, out_f, g = args.in_features, args.out_features, args.group_size
    # a checkpoint's integers as its writer left them: q, integer zero points, float16 scales
    q = torch.randint(0, 16, (in_f, out_f))
    z = torch.randint(4, 12, (in_f // g, out_f))
    s = (torch.rand(in_f // g, out_f) * 0.002 + 0.0005).half()
    stored = {"awq": (awq.pack_awq(q), awq.pack_awq(z)), "gptq": gptq.pack_gptq(q, z, 4, "gptq")}
    g_idx = (torch.arange(in_f) // g).int()
    for fmt, (qweight, qzeros) in stored.items():
        if fmt == "awq":
            args_of = lambda: awq.to_int4_linear_args(qweight, qzeros, s, g)                    # noqa: E731
            dequantized = lambda: awq.dequantize_awq(qweight, qzeros, s, g)                      # noqa: E731
        else:
            args_of = lambda: gptq.to_int4_linear_args(qweight, qzeros, s, g_idx, g)            # noqa: E731
            dequantized = lambda: gptq.dequantize_gptq(qweight, qzeros, s, g_idx, 4)            # noqa: E731

        def repack():
            a = args_of()
            return Int4Linear.from_int4(a["qweight"], a["scales"].to(torch.bfloat16), a["zeros"].to(torch.bfloat16),
                                        g, None, a["in_perm"])

        def round_trip():
            w = dequantized().to(torch.bfloat16)
            return Int4Linear.from_int4(*quantize_int4(w, g), g, None)

        exact = dequantized()
        direct, t_direct = _timed(repack)
        again, t_again = _timed(round_trip)
        e_direct = (direct.dequantize().float() - exact).abs().max().item()
        e_again = (again.dequantize().float() - exact).abs().max().item()
        print(f"{fmt:5s} [{out_f} x {in_f}] g{g}: direct repack {t_direct:6.2f} s, max weight error {e_direct:.2e}"
              f" | dequantise + requantise {t_again:6.2f} s, max weight error {e_again:.2e}"
              f" | time ratio {t_again / t_direct:.2f}x; step of one level ~{s.float().mean().item():.1e}")


if __name__ == "__main__":
    main()
