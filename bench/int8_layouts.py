"""The int8 layer's CPU layouts against bf16 and int4, kernel by kernel and through the engine, measured in
the same run with the machine's copy bandwidth.

    .venv/bin/python bench/int8_layouts.py                 # kernels at Qwen2-VL-2B shapes (~2 min)
    .venv/bin/python bench/int8_layouts.py --rows 1,8,16   # decode batches
    .venv/bin/python bench/int8_layouts.py --engine        # + batch-1 decode through LLM, every layout (~4 min)

Layouts (qwenvl/layers/quantized_linear.py): "plain" (PyTorch's _weight_int8pack_mm), "fbgemm" (its u8 x s8
GEMM with the activation split into 7-bit passes, layers/int8_vnni.py) and "tiles" (qwenvl's own kernel,
qwenvl/kernels/csrc/int8_kernel.hpp: activations quantised once per block of 32, VNNI dot products; its
AVX2 build in the "tiles avx2" column). Kernels: every layer type is timed over enough distinct matrices
(>= 256 MB) that none is served from the cache, as in a decode step, which reads each weight once; each
cell gives ms, GB/s of the kind's own bytes and that as a fraction of the copy bandwidth (read + write)
measured at the start. Engine: one LLM per layout on the bench checkpoint (bench/throughput.py builds it),
in ONE process, decoding in alternate rounds, so that a machine whose speed drifts (shared hosts) still
gives a fair ratio per round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (copy bandwidth, the bench checkpoint, requests)

SHAPES = {"q/o_proj": (1536, 1536), "k/v_proj": (256, 1536), "gate/up_proj": (8960, 1536),
          "down_proj": (1536, 8960), "output head": (151936, 1536)}
COLD_BYTES = 256 << 20


def best_seconds(calls, repeats: int = 5) -> float:
    """Best of `repeats` passes over `calls` (each a different matrix), per call."""
    for call in calls:
        call()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for call in calls:
            call()
        best = min(best, (time.perf_counter() - t0) / len(calls))
    return best


def _layers(out_f: int, in_f: int):
    """One layer of each kind with the same random weight: bf16, int8 in each layout, int4; as callables."""
    from qwenvl import kernels as qk
    from qwenvl.checkpoints.quantize import quantized_linear
    lin = torch.nn.Linear(in_f, out_f, bias=False).to(torch.bfloat16)
    plain = quantized_linear(lin.weight.detach(), None, "int8")
    packed = quantized_linear(lin.weight.detach(), None, "int8")
    packed.use_fbgemm_layout()
    layers = {"bf16": lin, "int8 plain": plain, "int8 fbgemm": packed}
    if qk.available():
        tiles = quantized_linear(lin.weight.detach(), None, "int8")
        tiles.use_tile_layout()
        layers["int8 tiles"] = tiles
        layers["int8 tiles avx2"] = lambda x: qk.int8_matmul(x, tiles.tiles, tiles._kernel_scales, None, out_f,
                                                             isa_name="avx2")
    layers["int4"] = quantized_linear(lin.weight.detach(), None, "int4")
    return layers


def kernels(rows_list: list[int], copy_bw: float, shapes: list[str]) -> None:
    torch.backends.mkldnn.enabled = False        # what the runner does for one-row steps (oneDNN's gemv is slower)
    print(f"\nkernel time per matrix (ms; cold: >= {COLD_BYTES >> 20} MB of distinct matrices per kind), GB/s "
          "of the kind's own bytes and its fraction of the copy bandwidth")
    kinds = tuple(_layers(16, 256))
    print(f"   {'layer':14s} {'rows':>4s} " + " ".join(f"{k:>24s}" for k in kinds))
    for name in shapes:
        out_f, in_f = SHAPES[name]
        count = max(1, COLD_BYTES // (out_f * in_f))
        layers = [_layers(out_f, in_f) for _ in range(count)]
        for rows in rows_list:
            torch.backends.mkldnn.enabled = rows > 1
            x = torch.randn(rows, in_f, dtype=torch.bfloat16)
            cells = []
            for kind in kinds:
                s = best_seconds([lambda m=m[kind]: m(x) for m in layers], repeats=3 if rows > 16 else 5)
                nbytes = out_f * in_f * {"bf16": 2, "int4": 0.5}.get(kind, 1)
                cells.append(f"{s * 1e3:9.3f} {nbytes / s / 1e9:6.1f} GB/s {nbytes / s / copy_bw:4.0%}")
            print(f"   {name:14s} {rows:4d} " + " ".join(cells), flush=True)
        del layers
    torch.backends.mkldnn.enabled = True


def engine(model_dir: Path, rounds: int, tokens: int) -> None:
    from qwenvl import LLM, SamplingParams
    from qwenvl.layers import int8_vnni
    msgs = [{"role": "user", "content": "Tell me a long story about a cat."}]
    from qwenvl import kernels as qk
    llms = {}
    for layout in ("plain", "fbgemm", "tiles") if qk.available() else ("plain", "fbgemm"):
        os.environ[int8_vnni.LAYOUT_ENV] = layout
        int8_vnni.int8_layout.cache_clear()
        llms[layout] = LLM(str(model_dir), dtype=torch.bfloat16, kv_cache_gb=0.1, quantization="int8")
        llms[layout].chat(msgs, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    del os.environ[int8_vnni.LAYOUT_ENV]
    int8_vnni.int8_layout.cache_clear()
    rates = {k: [] for k in llms}
    for _ in range(rounds):
        for layout, llm in llms.items():
            times = throughput.stream_request(llm, msgs, tokens + 1)[1]
            rates[layout].append(1 / statistics.median([b - a for a, b in zip(times, times[1:])]))
    print(f"\nbatch-1 int8 decode through LLM ({model_dir.name}), tok/s per round (median step of {tokens})")
    for layout, r in rates.items():
        print(f"   {layout:7s} " + " ".join(f"{x:6.2f}" for x in r))
    for layout in rates:
        if layout != "plain":
            print(f"   {layout} / plain per round: " + " ".join(f"{a / b:.2f}" for a, b in zip(rates[layout], rates["plain"])))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,4,256", help="activation rows per product, comma-separated")
    p.add_argument("--shapes", default=",".join(SHAPES), help="which of: " + ", ".join(SHAPES))
    p.add_argument("--engine", action="store_true", help="also decode through LLM with both layouts")
    p.add_argument("--dir", default="runs/bench_qwen2vl_2b", help="the bench checkpoint (bench/throughput.py)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--tokens", type=int, default=32)
    a = p.parse_args()
    from qwenvl import kernels as qk
    copy_bw = throughput.copy_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, VNNI {torch.cpu._is_vnni_supported()}, "
          f"AMX {torch.cpu._is_amx_tile_supported()}, qwenvl kernels {qk.isa()}; copy bandwidth "
          f"{copy_bw / 1e9:.1f} GB/s (read + write)")
    kernels([int(r) for r in a.rows.split(",")], copy_bw, a.shapes.split(","))
    if a.engine:
        engine(Path(a.dir), a.rounds, a.tokens)


if __name__ == "__main__":
    main()
