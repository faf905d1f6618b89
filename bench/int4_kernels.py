"""Every int4 matrix-vector product this PyTorch offers on a CPU, against the int8 layer, at decode's one row.

    .venv/bin/python bench/int4_kernels.py            # Qwen2-VL-2B's gate/up and down shapes (~1 min)

Why: int4 decode can only beat int8 decode by the ratio of their products' times, and that ratio is set by
the kernels, not by the engine. Each candidate multiplies one bf16 row by matrices of the same shape (enough
distinct ones, >= 256 MB, that none is served from the cache, as in a decode step) and is reported in ms and
in GB/s of the bytes it reads, next to the machine's copy bandwidth measured in the same run:
  - qwenvl's Int4Linear: `aten._weight_int4pack_mm_for_cpu` on its packed layout (group 128);
  - `quantized.int4mm_packed_weight_cpu`, the same kind of product through the quantized namespace;
  - fbgemm's 4-bit row-wise embedding bag used as a product (y = sum_k x_k * W[:, k]: one bag per block
    of 128 outputs, the input as per-sample weights), the only fbgemm int4 kernel PyTorch ships;
  - qwenvl's Int8Linear in the layout this CPU gets (fbgemm's with its activation split where it has VNNI
    and no AMX), the bar int4 has to clear by 1.3x.
Not timed: `aten._dyn_quant_matmul_4bit`, KleidiAI's on Arm; on x86 its pack stores the weights as float32
(a 8960 x 1536 pack is 14.2 M float32 values, 8x the int4 bytes), so it is no int4 kernel here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (copy bandwidth)
from int8_layouts import COLD_BYTES, best_seconds  # noqa: E402  (cold timing over distinct matrices)

SHAPES = {"gate/up_proj": (8960, 1536), "down_proj": (1536, 8960)}
BAG_BLOCK = 128


def int4_linear(w: torch.Tensor):
    from qwenvl.checkpoints.quantize import quantized_linear
    layer = quantized_linear(w, None, "int4")
    return lambda x: layer(x), w.numel() // 2


def int4mm_packed(w: torch.Tensor):
    from qwenvl.checkpoints.quantize import quantized_linear
    layer = quantized_linear(w, None, "int4")         # its packed weights and group parameters, as the kernel's
    group, packed, sz = torch.tensor(layer.group_size), layer.packed, layer.scales_and_offsets
    return lambda x: torch.ops.quantized.int4mm_packed_weight_cpu(x, packed, group, sz), w.numel() // 2


def embedding_bag_4bit(w: torch.Tensor):
    out_f, in_f = w.shape
    blocks = out_f // BAG_BLOCK
    rows = w.float().t().reshape(in_f, blocks, BAG_BLOCK).transpose(0, 1).reshape(-1, BAG_BLOCK)
    table = torch.ops.quantized.embedding_bag_4bit_prepack(rows.contiguous())     # [blocks * in, 64 + 4] u8
    indices = torch.arange(blocks * in_f, dtype=torch.int32)
    offsets = torch.arange(0, blocks * in_f + 1, in_f, dtype=torch.int32)

    def product(x):
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


KINDS = {"Int4Linear (int4pack_mm)": int4_linear, "int4mm_packed_weight_cpu": int4mm_packed,
         "fbgemm 4-bit embedding bag": embedding_bag_4bit,
         "Int8Linear (this CPU's layout)": int8_linear}


def main() -> None:
    torch.backends.mkldnn.enabled = False           # as the runner sets it for one-row steps
    bandwidth = throughput.copy_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    print("\none bf16 row times one matrix: ms per product, GB/s of the bytes each kernel reads")
    for name, (out_f, in_f) in SHAPES.items():
        x = torch.randn(1, in_f, dtype=torch.bfloat16)
        times = {}
        for kind, make in KINDS.items():
            count = max(2, COLD_BYTES // (out_f * in_f // 2))
            try:
                built = [make(torch.randn(out_f, in_f, dtype=torch.bfloat16) * 0.02) for _ in range(count)]
            except RuntimeError as e:                     # a kernel this build or CPU does not offer
                print(f"   {name:13s} {kind:32s} unavailable: {str(e).splitlines()[0][:80]}")
                continue
            s = best_seconds([lambda f=f: f(x) for f, _ in built])
            times[kind] = s
            print(f"   {name:13s} {kind:32s} {s * 1e3:7.3f} ms {built[0][1] / s / 1e9:6.1f} GB/s", flush=True)
            del built
        int8 = times.get("Int8Linear (this CPU's layout)")
        best, kind = min((s, k) for k, s in times.items() if not k.startswith("Int8"))
        print(f"   {name:13s} fastest int4: {kind}, {out_f * in_f / 2 / best / bandwidth:.0%} of the copy bandwidth"
              + (f"; int8 / int4 time per product {int8 / best:.2f}x" if int8 else ""))

if __name__ == "__main__":
    main()
