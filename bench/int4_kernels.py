"""Every int4 matrix-vector product this PyTorch offers on a CPU, and qwenvl's own, against the int8 layer.

    .venv/bin/python bench/int4_kernels.py [--rounds 3]   # Qwen2-VL-2B's gate/up and down shapes (~2 min)
    .venv/bin/python bench/int4_kernels.py --step         # a decode step's products, 1 and 8 rows (~1 min)

Why: int4 decode can only beat int8 decode by the ratio of their products' times, and that ratio is set by
the kernels, not by the engine. Each candidate multiplies bf16 rows (1, a single sequence's decode step, and
8, a batch of 8 sequences) by matrices of the same shape (enough distinct ones, >= 256 MB, that none is
served from the cache, as in a decode step) and is reported in ms and in GB/s of the bytes it reads, next
to the machine's copy bandwidth measured in the same run. The kinds are timed in alternating rounds (the
machine may be shared: medians over rounds, each round the best of 5 passes):
  - qwenvl's Int4Linear in the tile layout: its own kernel (qwenvl/kernels, AVX-512 VNNI here), called
    through the layer as the model calls it, and the same kernel's AVX2 build called directly;
  - Int4Linear in PyTorch's layout: `aten._weight_int4pack_mm_for_cpu` (what runs where our kernels do not);
  - `quantized.int4mm_packed_weight_cpu`, the same kind of product through the quantized namespace;
  - fbgemm's 4-bit row-wise embedding bag used as a product (y = sum_k x_k * W[:, k]: one bag per block
    of 128 outputs, the input as per-sample weights), the only fbgemm int4 kernel PyTorch ships (1 row);
  - qwenvl's Int8Linear in the layout this CPU gets, the bar int4 has to clear.
Not timed: `aten._dyn_quant_matmul_4bit`, KleidiAI's on Arm; on x86 its pack stores the weights as float32
(a 8960 x 1536 pack is 14.2 M float32 values, 8x the int4 bytes), so it is no int4 kernel here.
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
from int8_layouts import COLD_BYTES, best_seconds  # noqa: E402  (cold timing over distinct matrices)

SHAPES = {"gate/up_proj": (8960, 1536), "down_proj": (1536, 8960)}
ROWS = (1, 8)
GROUP = 128
BAG_BLOCK = 128


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _int4_layer(w: torch.Tensor, layout: str):
    from qwenvl.layers.quantized_linear import Int4Linear
    return Int4Linear.from_weight(w, GROUP, None, layout=layout)


def ours(w: torch.Tensor):
    layer = _int4_layer(w, "tiles")
    return lambda x: layer(x), _nbytes(layer.packed, layer.group_params)


def ours_avx2(w: torch.Tensor):
    from qwenvl import kernels
    layer = _int4_layer(w, "tiles")
    packed, params, n = layer.packed, layer.group_params, layer.out_features
    return lambda x: kernels.int4_matmul(x, packed, params, GROUP, n, isa_name="avx2"), _nbytes(packed, params)


def int4pack(w: torch.Tensor):
    layer = _int4_layer(w, "int4pack")
    return lambda x: layer(x), _nbytes(layer.packed, layer.scales_and_offsets)


def int4mm_packed(w: torch.Tensor):
    layer = _int4_layer(w, "int4pack")         # its packed weights and group parameters, as the kernel's
    group, packed, sz = torch.tensor(layer.group_size), layer.packed, layer.scales_and_offsets
    return lambda x: torch.ops.quantized.int4mm_packed_weight_cpu(x, packed, group, sz), _nbytes(packed, sz)


def embedding_bag_4bit(w: torch.Tensor):
    out_f, in_f = w.shape
    blocks = out_f // BAG_BLOCK
    rows = w.float().t().reshape(in_f, blocks, BAG_BLOCK).transpose(0, 1).reshape(-1, BAG_BLOCK)
    table = torch.ops.quantized.embedding_bag_4bit_prepack(rows.contiguous())     # [blocks * in, 64 + 4] u8
    indices = torch.arange(blocks * in_f, dtype=torch.int32)
    offsets = torch.arange(0, blocks * in_f + 1, in_f, dtype=torch.int32)

    def product(x):
        if x.shape[0] != 1:
            raise RuntimeError("one row only")
        weights = x.float().reshape(-1).repeat(blocks)
        return torch.ops.quantized.embedding_bag_4bit_rowwise_offsets(
            table, indices, offsets, False, 0, False, weights, None, True).view(1, out_f)
    return product, table.numel()


def int8_linear(w: torch.Tensor):
    from qwenvl.layers.int8_vnni import uses_fbgemm_layout
    from qwenvl.checkpoints.quantize import quantized_linear
    layer = quantized_linear(w, None, "int8")
    if uses_fbgemm_layout(*w.shape):
        layer.use_fbgemm_layout()
    return lambda x: layer(x), w.numel()


KINDS = {"qwenvl int4 kernel (Int4Linear, tiles)": ours, "qwenvl int4 kernel, AVX2 build": ours_avx2,
         "Int4Linear int4pack (int4pack_mm)": int4pack, "int4mm_packed_weight_cpu": int4mm_packed,
         "fbgemm 4-bit embedding bag": embedding_bag_4bit, "Int8Linear (this CPU's layout)": int8_linear}


def _available_kinds() -> dict:
    from qwenvl import kernels
    kinds = dict(KINDS)
    if kernels.isa() is None:
        print("qwenvl's kernels are not available here (QWENVL_KERNELS or the build): their rows are skipped")
        kinds = {k: v for k, v in kinds.items() if not k.startswith("qwenvl")}
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds over the kinds (medians)")
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    torch.backends.mkldnn.enabled = False           # as the runner sets it for one-row steps
    from qwenvl import kernels
    kinds = _available_kinds()
    bandwidth = throughput.copy_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, qwenvl kernels: {kernels.isa()}; "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    print(f"bf16 rows times one matrix (group {GROUP}): ms per product (median of {args.rounds} alternating "
          "rounds), GB/s of the bytes each kernel reads, that as a fraction of the copy bandwidth")
    for name in args.shapes:
        out_f, in_f = SHAPES[name]
        xs = {rows: torch.randn(rows, in_f, dtype=torch.bfloat16) for rows in ROWS}
        built = {}
        for kind, make in kinds.items():
            count = max(2, COLD_BYTES // (out_f * in_f // 2))
            try:
                built[kind] = [make(torch.randn(out_f, in_f, dtype=torch.bfloat16) * 0.02) for _ in range(count)]
            except RuntimeError as e:                     # a kernel this build or CPU does not offer
                print(f"   {name:13s} {kind:40s} unavailable: {str(e).splitlines()[0][:80]}")
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):
            for kind, calls in built.items():
                for rows, x in xs.items():
                    try:
                        s = best_seconds([lambda f=f: f(x) for f, _ in calls])
                    except RuntimeError:                  # one row only (the embedding bag)
                        continue
                    times.setdefault((kind, rows), []).append(s)
        for (kind, rows), ss in times.items():
            s, nbytes = statistics.median(ss), built[kind][0][1]
            one = times.get((kind, 1))
            ratio = f"   {rows}-row / 1-row time {s / statistics.median(one):.2f}x" if rows > 1 and one else ""
            print(f"   {name:13s} {kind:40s} rows {rows:2d} {s * 1e3:7.3f} ms {nbytes / s / 1e9:6.1f} GB/s "
                  f"{nbytes / s / bandwidth:5.0%}{ratio}", flush=True)
        for rows in ROWS:
            ours_s = times.get(("qwenvl int4 kernel (Int4Linear, tiles)", rows))
            pack_s = times.get(("Int4Linear int4pack (int4pack_mm)", rows))
            int8_s = times.get(("Int8Linear (this CPU's layout)", rows))
            if ours_s and pack_s:
                print(f"   {name:13s} rows {rows}: int4pack_mm / ours {statistics.median(pack_s) / statistics.median(ours_s):.2f}x"
                      + (f", int8 / ours {statistics.median(int8_s) / statistics.median(ours_s):.2f}x" if int8_s else ""))
        del built


# A decode step's linears at Qwen2-VL-2B widths, fused as the engine fuses them (q/k/v, gate/up), 28 layers.
STEP_LAYER = {"qkv": (2048, 1536), "o": (1536, 1536), "gate/up": (17920, 1536), "down": (1536, 8960)}
STEP_LAYERS = 28


def decode_step(rounds: int) -> None:
    """Every int4 product of a decode step (no attention, no head) in each layout, for 1 and 8 rows: what the
    issue's "a step of 8 sequences costs <= 1.4x a step of one" asks of the kernels."""
    from qwenvl import kernels
    layouts = ["tiles", "int4pack"] if kernels.isa() else ["int4pack"]
    steps = {}
    for layout in layouts:
        layers = [_int4_layer(torch.randn(o, i, dtype=torch.bfloat16) * 0.02, layout)
                  for _ in range(STEP_LAYERS) for o, i in STEP_LAYER.values()]
        steps[layout] = (layers, sum(_nbytes(l.packed, l.params) for l in layers))
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(rounds):
        for layout, (layers, _) in steps.items():
            for rows in ROWS:
                xs = {i: torch.randn(rows, i, dtype=torch.bfloat16) for i in (1536, 8960)}
                calls = [lambda layer=layer: layer(xs[layer.in_features]) for layer in layers]
                for call in calls:
                    call()
                t0 = time.perf_counter()
                for call in calls:
                    call()
                times.setdefault((layout, rows), []).append(time.perf_counter() - t0)
    for (layout, rows), ss in times.items():
        s, nbytes = statistics.median(ss), steps[layout][1]
        ratio = f"   {rows}-row / 1-row {s / statistics.median(times[(layout, 1)]):.2f}x" if rows > 1 else ""
        print(f"   decode step, {layout:9s} rows {rows}: {s * 1e3:7.2f} ms, {nbytes / s / 1e9:5.1f} GB/s{ratio}")


if __name__ == "__main__":
    if "--step" in sys.argv:
        torch.backends.mkldnn.enabled = False
        print(f"copy bandwidth {throughput.copy_bandwidth() / 1e9:.1f} GB/s (read + write)")
        decode_step(int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 5)
    else:
        main()
