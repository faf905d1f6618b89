"""Weight-only quantised linears with nn.Linear's interface: int8 per output channel, int4 group-wise.

Which kernel runs, and why (measured on a 2-core Xeon with AMX, torch 2.13, a 1536 -> 8960 product,
bfloat16 activations; `python bench/throughput.py` re-measures the end-to-end effect):

  rows |  bf16 F.linear | _weight_int8pack_mm | _weight_int4pack_mm_for_cpu | cast to bf16 scratch + GEMM
     1 |        1.37 ms |            0.44 ms  |                     0.41 ms |           ~1.2 ms + GEMM
     8 |              - |            2.12 ms  |                     1.50 ms |                         -
    16 |        2.01 ms |            4.24 ms  |                     2.71 ms |   1.2 ms + 2.0 ms (int8)
   256 |       17.2  ms |           69    ms  |                    50    ms |   1.2 ms + 17  ms (int8)

PyTorch's packed kernels stream the weights 3x faster than bf16 at one row (decode reads every weight
once per token, so this is the decode speed-up) but scale linearly with rows, while the bf16 GEMM does
not: from `DECODE_MAX_ROWS + 1` rows on (prefill, vision-heavy prompts, large batches) the layer writes
its integer weights into a reused bf16 scratch matrix and runs the GEMM, which costs ~7% over plain bf16
for int8. On other devices (CUDA) the layer dequantises the same way: the math is identical.

int4 decode no longer runs `_weight_int4pack_mm_for_cpu` where qwenvl's own kernels build (qwenvl/kernels:
int8 activations per group, VNNI integer dot products on a tile layout, up to 16 rows reading the weights
once; qwenvl/kernels/int4_layout.py says why and what it measured); that kernel stays where ours do not.

That table is the plain int8 layout. On CPUs with VNNI and no AMX (Zen 4 EPYC) the int8 kernel above is
compute bound (~17 GB/s of int8, no faster than bf16), and a large layer moves into fbgemm's packed layout
after loading (`use_fbgemm_layout`, layers/int8_vnni.py), which serves every row count: 1.35-1.45x the
plain layout's batch-1 decode there (`bench/int8_layouts.py --engine`). Small layers (q/k/v and o at 2B
widths) stay plain: around so short a product fbgemm's activation split costs more than its read saves.

Where qwenvl's own kernels run (qwenvl/kernels), both kinds take their tile layouts instead and decode
products of up to 16 rows run there: each activation row quantised once per product to int8 per block of
32 (llama.cpp's Q8_0 arithmetic; float32 activations take three such passes), integer dot products read
every weight once for all rows. For int8 this replaces both kernels above at decode and drops fbgemm's 7-bit
split (bench/int8_layouts.py); bf16 activations then carry Q8_0's rounding, at most half a step of their
block's largest value an input (tests/test_kernels_int8_bf16.py bounds it).

Conventions (the AWQ/GPTQ ones, so published checkpoints repack without re-quantising):
  int8: w[o, i] = q[o, i] * scale[o]                               q in -127..127
  int4: w[o, i] = (q[o, i] - zero[o, g]) * scale[o, g], g = i // G  q in 0..15, zero an integer-domain point
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..kernels import int4_layout, int8_layout, weight_memory
from .int8_vnni import FbgemmInt8Weight, per_channel_quantized

DECODE_MAX_ROWS = 8                 # at most this many rows: PyTorch's packed matrix-vector kernels
INT4_GROUP_SIZES = (256, 128, 64, 32)   # what _weight_int4pack_mm_for_cpu accepts
_INT4_BLOCK_N = 64                  # the CPU int4 pack stores [N / 64, K, 32] bytes (see _unpack_cpu_int4)

_scratch = threading.local()


def _scratch_matrix(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [rows, cols] matrix from one buffer reused by every quantised layer (per thread, dtype, device).

    A fresh 20-50 MB allocation per layer per step costs page faults comparable to the cast itself.
    """
    key = (dtype, device)
    bufs = _scratch.__dict__.setdefault("bufs", {})
    buf = bufs.get(key)
    if buf is None or buf.numel() < rows * cols:
        # a normal tensor even when first asked for under inference_mode: an inference tensor could not be
        # written by a later call made outside it
        with torch.inference_mode(False):
            buf = bufs[key] = torch.empty(rows * cols, dtype=dtype, device=device)
    return buf[: rows * cols].view(rows, cols)


_PREFILL_BLOCK_ELEMENTS = 8 << 20      # weights dequantised at a time for a many-row product: 16 MB in bf16


def _prefill_product(x2: torch.Tensor, n_rows: int, in_features: int, dequantize_rows) -> torch.Tensor:
    """x2 [R, in] @ W.T for a quantised W [n_rows, in], dequantised into the scratch matrix a block of output
    rows at a time: `dequantize_rows(r0, r1, out)` writes rows r0:r1 of W into out [r1 - r0, in] and returns it.

    Why blocks: a whole matrix at once makes a 17920-row gate/up a 55 MB scratch, and the int4 unpacking and
    the GEMM's weight reorder each take about as much again, all held at the process's peak. Blocks of
    ~16 MB cut those transients (the peak RSS of an image request) while each block is still thousands of
    rows, as compute bound as the whole product."""
    block = max(_INT4_BLOCK_N, _PREFILL_BLOCK_ELEMENTS // in_features // _INT4_BLOCK_N * _INT4_BLOCK_N)
    if block >= n_rows:
        return F.linear(x2, dequantize_rows(0, n_rows, _scratch_matrix(n_rows, in_features, x2.dtype, x2.device)))
    y = torch.empty(x2.shape[0], n_rows, dtype=x2.dtype, device=x2.device)
    for r0 in range(0, n_rows, block):
        r1 = min(r0 + block, n_rows)
        y[:, r0:r1] = F.linear(x2, dequantize_rows(r0, r1, _scratch_matrix(r1 - r0, in_features, x2.dtype,
                                                                             x2.device)))
    return y


# ---------------------------------------------------------------------------------------- quantisers
_CHUNK_ROWS = 4096      # quantise this many output rows at a time: a 151936-row head in float32 at once
                        # would need ~3 float copies of itself (~2.8 GB at 1536 wide) on top of the model


def _by_row_chunks(fn, w: torch.Tensor, *args) -> tuple[torch.Tensor, ...]:
    parts = [fn(chunk, *args) for chunk in w.split(_CHUNK_ROWS)]
    return tuple(torch.cat(p) for p in zip(*parts))


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w[out, in] float -> (q int8 [out, in], scale [out]); symmetric per output channel, |q| <= 127.

    The scale is rounded to its storage dtype first and q computed from the rounded scale, so the stored
    pair reproduces w to within half a step."""
    return _by_row_chunks(_quantize_int8_rows, w, scale_dtype or w.dtype)


def _quantize_int8_rows(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    wf = w.to(torch.float32, copy=True)          # divided in place below: never the caller's tensor
    scale = (wf.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(scale_dtype)
    q = torch.round(wf.div_(scale.float()[:, None])).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int = 128, scale_dtype: torch.dtype | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w[out, in] float -> (q uint8 0..15 [out, in], scale [out, in/G], zero [out, in/G]); asymmetric per
    group of `group_size` input columns, integer zero points (AWQ's convention)."""
    if w.shape[1] % group_size:
        raise ValueError(f"int4: in_features {w.shape[1]} is not a multiple of the group size {group_size}")
    return _by_row_chunks(_quantize_int4_rows, w, group_size, scale_dtype or w.dtype)


def _quantize_int4_rows(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out_f, in_f = w.shape
    wg = w.to(torch.float32, copy=True).view(out_f, in_f // group_size, group_size)    # [O, G, gs]
    lo = wg.amin(dim=2).clamp(max=0.0)         # the range always holds 0, so the zero point is in 0..15
    hi = wg.amax(dim=2).clamp(min=0.0)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12).to(scale_dtype)
    sf = scale.float()
    zero = torch.round(-lo / sf).clamp_(0, 15)
    q = torch.round(wg.div_(sf[..., None]).add_(zero[..., None])).clamp_(0, 15).to(torch.uint8)
    return q.view(out_f, in_f), scale, zero.to(scale_dtype)


def int4_group_size(in_features: int, preferred: int = 128) -> int | None:
    """The group size an int4 layer of this width uses: `preferred` when the row holds at least 4 such
    groups, else the largest kernel-supported size that divides the width into 4 or more groups (narrow
    layers: one group per row would let one outlier set the step of the whole row; on the bundled model's
    128-wide layers group 128 cost 11.5 grounding points, group 32 3.5); None when no supported size
    divides the width (the caller falls back to int8)."""
    sizes = [g for g in INT4_GROUP_SIZES if in_features % g == 0]
    if not sizes:
        return None
    if preferred in sizes and in_features >= 4 * preferred:
        return preferred
    small = [g for g in sizes if g <= min(preferred, in_features // 4)]
    return max(small) if small else min(sizes)


# ------------------------------------------------------------------------------------------- int8
INT8_KERNEL_MAX_ROWS = 16     # at most this many rows: qwenvl's int8 kernel (it reads the weights once for all)
# Rows up to which a layer runs the int8 kernel in calls of INT8_KERNEL_MAX_ROWS (a decode batch of 32 is two
# passes over the weights), rather than dequantising them into a bf16 scratch for a GEMM: at 32 rows two kernel
# calls cost 125 us against 279 us for the bundled model's gate/up (issue 37, 32 clients), and each row's result
# is the same as alone or in a batch of 16 (rows are quantised on their own), so a sequence decodes the same at
# any batch size up to here.
INT8_KERNEL_CHUNKED_ROWS = 2 * INT8_KERNEL_MAX_ROWS


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + bias, weights stored as int8 with one scale per output channel.

    Three CPU layouts of the same integers, one copy at a time: plain `qweight` [out, in] (as loaded and
    stacked; PyTorch's _weight_int8pack_mm for decode), qwenvl's tiles (`use_tile_layout`, where the kernels
    run: decode products of up to 16 rows in qwenvl/kernels, activations quantised to int8 per block of 32)
    and fbgemm's (`use_fbgemm_layout`, VNNI CPUs without AMX when the kernels do not run). Prefill (more
    rows) casts the integers into a bf16 scratch and runs the GEMM from any of them."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.to(torch.int8).contiguous())          # [out, in]
        self.register_buffer("scales", scales.contiguous())                             # [out]
        self.register_buffer("bias", None if bias is None else bias.detach().to(scales.dtype))
        self.register_buffer("tiles", None)     # set by use_tile_layout(): then qweight is None
        self._fbgemm: FbgemmInt8Weight | None = None     # set by use_fbgemm_layout(): then qweight is None
        self._kernel_scales: torch.Tensor | None = None  # float32 [N_pad] and [out]: the kernel's operands
        self._kernel_bias: torch.Tensor | None = None

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Int8Linear":
        q, s = quantize_int8(linear.weight.detach())
        return cls(q, s, linear.bias)

    @classmethod
    def from_int8(cls, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> "Int8Linear":
        if qweight.dim() != 2 or scales.shape != (qweight.shape[0],):
            raise ValueError(f"int8: qweight {tuple(qweight.shape)} and scales {tuple(scales.shape)} do not fit")
        return cls(qweight, scales, bias)

    def use_tile_layout(self) -> None:
        """Move the weights into qwenvl's int8 tiles (qwenvl/kernels/int8_layout.py) for the kernels' decode
        product (CPU). The plain matrix is dropped, so the layer keeps one copy of its weights."""
        if self.qweight is not None and self.qweight.device.type == "cpu":
            tiles = int8_layout.pack(self.qweight)
            self.qweight = None
            self.tiles = tiles
            self._kernel_scales = int8_layout.pack_scales(self.scales)
            self._kernel_bias = None if self.bias is None else self.bias.float().contiguous()

    def use_fbgemm_layout(self) -> None:
        """Move the weights into fbgemm's packed layout (CPU; see int8_vnni.py for when and why). The plain
        int8 matrix is dropped, so the layer keeps one copy of its weights."""
        if self._fbgemm is None and self.qweight is not None and self.qweight.device.type == "cpu":
            quantized = per_channel_quantized(self.qweight, self.scales)
            self.qweight = None                  # before packing: at most two copies of this layer at once
            self._fbgemm = FbgemmInt8Weight(quantized, self.scales.dtype)

    @property
    def layout(self) -> str:
        return "tiles" if self.tiles is not None else "fbgemm" if self._fbgemm is not None else "plain"

    @property
    def packed_weight_bytes(self) -> int:
        """Bytes of weights held outside the module's buffers (the fbgemm layout), else 0."""
        return 0 if self._fbgemm is None else self._fbgemm.nbytes()

    def _integers(self) -> torch.Tensor:
        if self.tiles is not None:
            return int8_layout.unpack(self.tiles, self.out_features, self.in_features)
        return self.qweight if self._fbgemm is None else self._fbgemm.unpack()[0]

    def dequantize(self) -> torch.Tensor:
        return self._integers().to(self.scales.dtype) * self.scales[:, None]

    def dequantized_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight [*ids.shape, in] in the scales' dtype, read from whichever layout holds
        the integers (a tied embedding's lookup: layers/quantized_embedding.py). Equal to dequantize()[ids]."""
        flat = ids.reshape(-1)
        if self.tiles is not None:
            q = int8_layout.gather_rows(self.tiles, flat, self.in_features)
        else:
            q = self._integers()[flat]          # the fbgemm layout unpacks whole: only a plain table's fallback
        rows = q.to(self.scales.dtype).mul_(self.scales[flat].unsqueeze(-1))
        return rows.view(*ids.shape, self.in_features)

    def _integer_rows(self, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
        if self.tiles is not None and out.dtype == torch.bfloat16 and out.is_contiguous() and kernels.available():
            return kernels.int8_rows_to_bf16(self.tiles, r0, r1, out)     # ~3x the strided copy below
        if self.tiles is not None:
            return int8_layout.rows_into(self.tiles, r0, r1, self.in_features, out)
        return out.copy_(self.qweight[r0:r1])

    def decode_product(self) -> tuple | None:
        """This layer's decode product for a compiled decode stack (layers/decode_stack.py): the kernel's
        operands, as forward hands them over for up to INT8_KERNEL_CHUNKED_ROWS rows; None where forward
        does not run the kernel (no tile layout)."""
        if self.tiles is None:
            return None
        return ("int8", self.tiles, self._kernel_scales, self._kernel_bias, self.out_features, 0,
                INT8_KERNEL_CHUNKED_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tiles is not None and 0 < x.numel() <= INT8_KERNEL_CHUNKED_ROWS * self.in_features \
                and x.dtype in (torch.bfloat16, torch.float32) and x.device.type == "cpu" and kernels.available():
            # decode: the kernel quantises each row per block of 32, adds the bias and writes x's dtype
            x2 = x.reshape(-1, self.in_features)
            if x2.shape[0] <= INT8_KERNEL_MAX_ROWS:
                y = kernels.int8_matmul(x2, self.tiles, self._kernel_scales, self._kernel_bias, self.out_features)
            else:
                y = torch.cat([kernels.int8_matmul(part, self.tiles, self._kernel_scales, self._kernel_bias,
                                                   self.out_features) for part in x2.split(INT8_KERNEL_MAX_ROWS)])
            return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)
        if self._fbgemm is not None and x.dim() == 2:          # decode's case, in the fewest ops
            y = self._fbgemm.matmul(x)
            return y if self.bias is None else y.add_(self.bias.to(y.dtype))
        if self.qweight is not None and x.dim() == 2 and x.shape[0] <= DECODE_MAX_ROWS \
                and x.device.type == "cpu" and x.dtype == self.scales.dtype and x.is_contiguous():
            # decode through a plain layer (q/k/v and o keep it): the product below, in the fewest ops
            y = torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)
            return y if self.bias is None else y.add_(self.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)                                          # [R, in]
        if self._fbgemm is not None:
            y = self._fbgemm.matmul(x2)
        elif self.qweight is not None and x.device.type == "cpu" and x2.shape[0] <= DECODE_MAX_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scales.to(x.dtype))
        else:       # integers are exact in bf16: cast, multiply, then scale the output columns
            y = _prefill_product(x2, self.out_features, self.in_features,
                                 self._integer_rows).mul_(self.scales.to(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        layout = "" if self.layout == "plain" else f", {self.layout} layout"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8{layout}"


# ------------------------------------------------------------------------------------------- int4
def _unpack_cpu_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The inverse of _convert_weight_to_int4pack_for_cpu: packed uint8 [n, k/2] -> q uint8 [n, k].

    Its layout (checked by tests/test_quantization.py against the op): blocks of 64 output rows, each
    [k, 32] bytes, byte j of column i holding row j in the low nibble and row j + 32 in the high one."""
    b = packed.view(n // _INT4_BLOCK_N, k, _INT4_BLOCK_N // 2)
    q = torch.cat([b & 0x0F, b >> 4], dim=2)                                          # [n/64, k, 64]
    return q.transpose(1, 2).reshape(n, k)


def _pack_cpu_int4(q: torch.Tensor, n_pad: int) -> torch.Tensor:
    """q uint8 [n, k] -> the CPU kernel's packed uint8 [n_pad, k/2], rows past n zero. Packed in chunks of
    whole 64-row blocks (the layout's outer dimension), so the int32 copy the op wants stays small."""
    n, k = q.shape
    parts = []
    for start in range(0, n_pad, _CHUNK_ROWS):
        block = torch.zeros(min(_CHUNK_ROWS, n_pad - start), k, dtype=torch.int32)
        rows = q[start: start + block.shape[0]]
        block[: rows.shape[0]] = rows
        parts.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(block, 1))
    return torch.cat(parts)


INT4_KERNEL_MAX_ROWS = 16     # at most this many rows: qwenvl's int4 kernel (it reads the weights once for all)
LAYOUT_TILES = "tiles"          # qwenvl's own kernel layout (qwenvl/kernels/int4_layout.py)
LAYOUT_INT4PACK = "int4pack"    # PyTorch's _weight_int4pack_mm_for_cpu layout, where our kernels do not run
_KERNEL_DTYPES = (torch.bfloat16, torch.float32)     # the activations qwenvl's int4 kernel takes


def default_int4_layout() -> str:
    """The layout a new Int4Linear takes: qwenvl's tiles where its kernels run (QWENVL_KERNELS, a compiler),
    else PyTorch's int4pack, run by `_weight_int4pack_mm_for_cpu` as before the kernels existed."""
    return LAYOUT_TILES if kernels.available() else LAYOUT_INT4PACK


def _tile_param_dtype(scale_dtype: torch.dtype) -> torch.dtype:
    """bfloat16 scales keep bfloat16 group parameters (their mins rounded to bfloat16, as int4pack's offsets
    always were): 4.25 bits a weight at group 128. Any other scale dtype (AWQ/GPTQ's float16, GGUF's
    products) gets float32, where scales and mins are exact: no second rounding."""
    return torch.bfloat16 if scale_dtype == torch.bfloat16 else torch.float32


def _joined(parts: list[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """torch.cat of a layer's packed parts into a tensor on 2 MiB pages where they are on the CPU (as the layouts
    allocate theirs: kernels/weight_memory.py), so a load-time quantised layer keeps the pages its parts had."""
    if parts[0].device.type != "cpu":
        return torch.cat(parts, dim=dim)
    shape = list(parts[0].shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    return torch.cat(parts, dim=dim, out=weight_memory.empty(shape, parts[0].dtype))


class Int4Linear(nn.Module):
    """y = x[..., in_perm] @ W.T + bias, w = q * scale + min per group of `group_size` inputs, q in 0..15.

    Two layouts, chosen at construction (`default_int4_layout()`), both dequantising to the same matrix:
      tiles     qwenvl's kernel (qwenvl/kernels): packed uint8 [N_pad16, in/2] and group_params
                [N_pad16/16, in/G, 2, 16] (scales, mins) in bfloat16 or float32, or, for a GGUF's Q4_K
                (`from_q4_k`), its super-blocks uint8 [N_pad16/16, in/256, 320]; decode products of up to
                16 rows run there.
      int4pack  PyTorch's CPU kernel: packed uint8 [N_pad64, in/2] and scales_and_offsets [in/G, N_pad64, 2]
                in its form w = (q - 8) * scale + offset, offset = 8 * scale + min; up to 8 rows.
    More rows (prefill) dequantise blocks into a bf16 scratch and run the GEMM, in both layouts.
    AWQ/GPTQ's integer zero points are min = -zero * scale (`from_int4`); llama.cpp's Q4_K sub-blocks are
    scale = d * sc, min = -dmin * m (`from_q4_k`, which keeps Q4_K's own super-blocks in the tile layout)."""

    def __init__(self, packed: torch.Tensor, params: torch.Tensor, out_features: int, in_features: int,
                 group_size: int, bias: torch.Tensor | None, in_perm: torch.Tensor | None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.out_features, self.in_features, self.group_size = out_features, in_features, group_size
        # the tile layout's params are 4-D floats or Q4_K's uint8 super-blocks; int4pack's are 3-D floats
        self.layout = LAYOUT_TILES if params.dim() == 4 or params.dtype == torch.uint8 else LAYOUT_INT4PACK
        # the model's dtype: dequantised rows and matrices come out in it (float32 group parameters do not say)
        self.weight_dtype = dtype or params.dtype
        self.register_buffer("packed", packed)                                        # uint8 [N_pad, in/2]
        self.register_buffer("group_params" if self.layout == LAYOUT_TILES else "scales_and_offsets", params)
        self.register_buffer("bias", bias)
        self.register_buffer("in_perm", in_perm)

    @property
    def params(self) -> torch.Tensor:
        return self.group_params if self.layout == LAYOUT_TILES else self.scales_and_offsets

    @property
    def super_blocks(self) -> bool:
        """Whether the group parameters are Q4_K's super-blocks (uint8, int4_layout.py), the third form."""
        return self.params.dtype == torch.uint8

    @property
    def row_block(self) -> int:
        """Output rows are padded to a multiple of this (concatenating layers needs whole blocks)."""
        return int4_layout.TILE_N if self.layout == LAYOUT_TILES else _INT4_BLOCK_N

    @classmethod
    def empty(cls, out_features: int, in_features: int, group_size: int, dtype: torch.dtype, bias: bool,
              layout: str | None = None) -> "Int4Linear":
        """Meta-device buffers of the shapes `from_weight` gives for a `dtype` weight, for the loader to fill."""
        layout = layout or default_int4_layout()
        meta = dict(device="meta")
        b = torch.empty(out_features, dtype=dtype, **meta) if bias else None
        groups = in_features // group_size
        if layout == LAYOUT_TILES:
            n_pad = int4_layout.padded_rows(out_features)
            params = torch.empty(n_pad // int4_layout.TILE_N, groups, 2, int4_layout.TILE_N,
                                 dtype=_tile_param_dtype(dtype), **meta)
        else:
            n_pad = -(-out_features // _INT4_BLOCK_N) * _INT4_BLOCK_N
            params = torch.empty(groups, n_pad, 2, dtype=dtype, **meta)
        return cls(torch.empty(n_pad, in_features // 2, dtype=torch.uint8, **meta), params, out_features,
                   in_features, group_size, b, None, dtype)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int = 128, layout: str | None = None) -> "Int4Linear":
        return cls.from_weight(linear.weight.detach(), group_size, linear.bias, layout)

    @classmethod
    def from_weight(cls, w: torch.Tensor, group_size: int, bias: torch.Tensor | None,
                    layout: str | None = None) -> "Int4Linear":
        """Quantise and pack w[out, in] a block of rows at a time, so the whole matrix's 4-bit codes (a byte
        each until packed) never exist at once: 233 MB for a 151936 x 1536 head, which set int4's load peak.
        The blocks are whole multiples of both layouts' row blocks, so only the last one is padded."""
        layout = layout or default_int4_layout()
        parts = [cls.from_int4(*quantize_int4(rows, group_size), group_size, None, layout=layout)
                 for rows in w.split(_CHUNK_ROWS)]
        b = None if bias is None else bias.detach().to(parts[0].packed.device, w.dtype)
        params_dim = 0 if layout == LAYOUT_TILES else 1
        return cls(_joined([p.packed for p in parts]), _joined([p.params for p in parts], dim=params_dim),
                   w.shape[0], w.shape[1], group_size, b, None, w.dtype)

    @classmethod
    def from_int4(cls, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                  bias: torch.Tensor | None, in_perm: torch.Tensor | None = None,
                  layout: str | None = None, dtype: torch.dtype | None = None) -> "Int4Linear":
        """AWQ/GPTQ's form: w = (q - zero) * scale, q uint8 [out, in], scales / zeros [out, in/G]; `dtype` the
        model's (default the scales')."""
        if zeros.shape != scales.shape:
            raise ValueError(f"int4: zeros {tuple(zeros.shape)} do not fit scales {tuple(scales.shape)}")
        mins = -(zeros.float().cpu() * scales.float().cpu())          # exact in float32 (4 bits x 24)
        return cls.from_scales_and_mins(qweight, scales, mins, group_size, bias, in_perm, layout,
                                        dtype=dtype or scales.dtype)

    @classmethod
    def from_scales_and_mins(cls, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                             group_size: int, bias: torch.Tensor | None, in_perm: torch.Tensor | None = None,
                             layout: str | None = None, dtype: torch.dtype | None = None) -> "Int4Linear":
        """w = q * scale + min: q uint8 0..15 [out, in], scales / mins [out, in/G]; `dtype` the model's
        (default the scales'). The tile layout keeps float32 scales and mins exactly (bfloat16 ones too)."""
        out_f, in_f = qweight.shape
        groups = in_f // group_size if group_size else 0
        if group_size not in INT4_GROUP_SIZES or in_f % group_size:
            raise ValueError(f"int4: group size {group_size} with in_features {in_f} is not supported "
                             f"(need one of {INT4_GROUP_SIZES} dividing in_features)")
        if scales.shape != (out_f, groups) or mins.shape != (out_f, groups):
            raise ValueError(f"int4: scales {tuple(scales.shape)} / mins {tuple(mins.shape)} do not fit "
                             f"qweight {tuple(qweight.shape)} in groups of {group_size}")
        layout = layout or default_int4_layout()
        dtype, device = dtype or scales.dtype, qweight.device
        if layout == LAYOUT_TILES:
            packed, params = int4_layout.pack(qweight.cpu(), scales.cpu(), mins.cpu(), group_size,
                                              _tile_param_dtype(scales.dtype))
        else:
            n_pad = -(-out_f // _INT4_BLOCK_N) * _INT4_BLOCK_N
            packed = _pack_cpu_int4(qweight.cpu(), n_pad)
            params = torch.zeros(groups, n_pad, 2, dtype=dtype)             # padded rows: scale 0 -> weight 0
            sf = scales.float().cpu()
            params[:, :out_f, 0] = sf.T.to(dtype)
            params[:, :out_f, 1] = (8.0 * sf + mins.float().cpu()).T.to(dtype)
        b = None if bias is None else bias.detach().to(device, dtype)
        perm = None if in_perm is None else in_perm.to(device, torch.long)
        return cls(packed.to(device), params.to(device), out_f, in_f, group_size, b, perm, dtype)

    @classmethod
    def stacked(cls, layers: list["Int4Linear"], bias: torch.Tensor | None) -> "Int4Linear | None":
        """One layer whose outputs are `layers`' side by side (fused q/k/v, gate/up), or None where they
        cannot be concatenated: different layouts or group sizes, input permutations, padded rows."""
        first = layers[0]
        if any(layer.in_perm is not None or layer.out_features % layer.row_block or layer.layout != first.layout
               or layer.group_size != first.group_size or layer.super_blocks != first.super_blocks
               for layer in layers):
            return None
        params_dim = 0 if first.layout == LAYOUT_TILES else 1
        return cls(_joined([layer.packed for layer in layers]),
                   _joined([layer.params for layer in layers], dim=params_dim),
                   sum(layer.out_features for layer in layers), first.in_features, first.group_size, bias, None,
                   first.weight_dtype)

    @classmethod
    def from_q4_k(cls, qweight: torch.Tensor, d: torch.Tensor, neg_dmin: torch.Tensor, sc: torch.Tensor,
                  m: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                  layout: str | None = None) -> "Int4Linear":
        """llama.cpp's Q4_K: w = d * sc * q + neg_dmin * m per group of 32, q uint8 0..15 [out, in], d / neg_dmin
        float16 [out, in/256] (the file's, neg_dmin = -dmin), sc / m uint8 [out, in/32] (6-bit); `dtype` the
        model's. The tile layout holds them in Q4_K's own super-block form (int4_layout.py: 4.625 bits a weight,
        the kernel forms the exact float32 scales and mins); PyTorch's int4pack layout (where our kernels do
        not run) gets the products, rounded to `dtype` as its offsets are."""
        layout = layout or default_int4_layout()
        if layout != LAYOUT_TILES or qweight.shape[1] % int4_layout.SUPER_K:
            scales = d.float()[..., None] * sc.float().view(*d.shape, -1)
            mins = neg_dmin.float()[..., None] * m.float().view(*d.shape, -1)
            return cls.from_scales_and_mins(qweight, scales.flatten(1), mins.flatten(1), int4_layout.BLOCK_K,
                                            bias, layout=layout, dtype=dtype)
        packed = int4_layout.pack_codes(qweight.cpu())
        params = int4_layout.pack_super_blocks(d.cpu(), neg_dmin.cpu(), sc.cpu(), m.cpu())
        b = None if bias is None else bias.detach().to(dtype)
        return cls(packed, params, qweight.shape[0], qweight.shape[1], int4_layout.BLOCK_K, b, None, dtype)

    @classmethod
    def from_scale_min(cls, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group_size: int,
                       bias: torch.Tensor | None) -> "Int4Linear":
        """w = q * scale + min per group (llama.cpp's Q4_0 / Q4_1 / Q4_K form; q 0..15, any float min), in the
        scales' dtype: `from_scales_and_mins` under the name the GGUF loader uses."""
        return cls.from_scales_and_mins(qweight, scales, mins, group_size, bias)

    def _dequantize_permuted(self, dtype: torch.dtype, out: torch.Tensor | None = None,
                             rows: tuple[int, int] | None = None) -> torch.Tensor:
        """[N_pad, in] in the kernel's column order (in_perm applied); or only `rows` (r0, r1), multiples of 64."""
        r0, r1 = rows if rows is not None else (0, self.packed.shape[0])
        if self.layout == LAYOUT_TILES:
            tile = int4_layout.TILE_N
            return int4_layout.dequantize(self.packed[r0:r1], self.group_params[r0 // tile: -(-r1 // tile)],
                                          self.in_features, self.group_size, dtype, out)
        n = r1 - r0
        q = _unpack_cpu_int4(self.packed[r0:r1], n, self.in_features)                   # [n, in]
        g = self.in_features // self.group_size
        sz = self.scales_and_offsets[:, r0:r1].to(dtype)
        w = out if out is not None else torch.empty(n, self.in_features, dtype=dtype, device=q.device)
        wg = w.view(n, g, self.group_size)
        wg.copy_(q.view(n, g, self.group_size)).sub_(8)
        wg.mul_(sz[..., 0].T[..., None]).add_(sz[..., 1].T[..., None])
        return w

    def dequantized_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the weight [*ids.shape, in], dequantised straight from the packed layout (an
        embedding lookup into a tied head: a few rows a step). Equal to dequantize()[ids]."""
        flat = ids.reshape(-1)
        if self.layout == LAYOUT_TILES:
            w = int4_layout.dequantize_rows(self.packed, self.group_params, self.in_features, self.group_size,
                                            flat, self.weight_dtype)
        else:
            b = self.packed.view(-1, self.in_features, _INT4_BLOCK_N // 2)            # [N_pad/64, in, 32]
            j = flat % _INT4_BLOCK_N                                                    # row j of its 64-row block
            byte = b[flat // _INT4_BLOCK_N, :, j % (_INT4_BLOCK_N // 2)]                # [R, in]
            q = torch.where((j < _INT4_BLOCK_N // 2)[:, None], byte & 0x0F, byte >> 4)
            sz = self.scales_and_offsets[:, flat]                                       # [in/G, R, 2]
            g = self.in_features // self.group_size
            w = q.view(-1, g, self.group_size).to(sz.dtype).sub_(8)
            w = w.mul_(sz[..., 0].T[..., None]).add_(sz[..., 1].T[..., None]).view(-1, self.in_features)
        if self.in_perm is not None:
            restored = torch.empty_like(w)
            restored[:, self.in_perm] = w
            w = restored
        return w.view(*ids.shape, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """[out, in] in the original input-column order, in the model's dtype."""
        w = self._dequantize_permuted(self.weight_dtype)[: self.out_features]
        if self.in_perm is None:
            return w
        restored = torch.empty_like(w)
        restored[:, self.in_perm] = w
        return restored

    def decode_product(self) -> tuple | None:
        """This layer's decode product for a compiled decode stack (layers/decode_stack.py): the kernel's
        operands and the bias forward adds after it, up to INT4_KERNEL_MAX_ROWS rows; None where forward
        does not run the kernel (another layout, an input permutation)."""
        if self.layout != LAYOUT_TILES or self.in_perm is not None:
            return None
        return ("int4", self.packed, self.group_params, self.bias, self.out_features, self.group_size,
                INT4_KERNEL_MAX_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == LAYOUT_TILES and x.dim() == 2 and x.shape[0] <= INT4_KERNEL_MAX_ROWS \
                and x.dtype in _KERNEL_DTYPES and x.device.type == "cpu" and self.in_perm is None \
                and x.is_contiguous() and kernels.available():
            # decode's case in the fewest Python steps (a 2B model makes ~115 of these a token)
            y = kernels.int4_matmul(x, self.packed, self.group_params, self.group_size, self.out_features)
            return y if self.bias is None else y.add_(self.bias.to(y.dtype))
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.in_perm is not None:
            x2 = x2.index_select(1, self.in_perm)
        rows, cpu = x2.shape[0], x.device.type == "cpu"
        if self.layout == LAYOUT_TILES and cpu and rows <= INT4_KERNEL_MAX_ROWS \
                and x.dtype in _KERNEL_DTYPES and kernels.available():
            y = kernels.int4_matmul(x2.contiguous(), self.packed, self.group_params, self.group_size,
                                    self.out_features)
        elif self.layout == LAYOUT_INT4PACK and cpu and rows <= DECODE_MAX_ROWS:
            sz = self.scales_and_offsets.to(x.dtype)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed, self.group_size, sz)
            y = y[:, : self.out_features]
        else:
            y = _prefill_product(x2, self.packed.shape[0], self.in_features,
                                 lambda r0, r1, w: self._dequantize_permuted(x.dtype, out=w, rows=(r0, r1)))
            y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    @staticmethod
    def pairs_run_in_kernel(layers: list["Int4Linear"]) -> bool:
        """Whether `products_by_pair` takes these layers: all in the tile layout, of one shape and group size,
        with no input permutation or bias (a MoE layer's experts)."""
        first = layers[0]
        return all(isinstance(layer, Int4Linear) and layer.layout == LAYOUT_TILES and layer.in_perm is None
                   and layer.bias is None and layer.in_features == first.in_features
                   and layer.out_features == first.out_features and layer.group_size == first.group_size
                   for layer in layers)

    @staticmethod
    def products_by_pair(layers: list["Int4Linear"], x: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """y[p] = layers[p](x[rows[p]]) for every pair p, in one kernel call: [P, out_features] in x's dtype,
        each row what the layer's own forward gives, bit for bit. x [R, in] contiguous bfloat16 or float32 on
        a CPU with qwenvl's kernels; the layers as `pairs_run_in_kernel` accepts."""
        return kernels.int4_matmul_pairs(x, rows, *Int4Linear.pair_operands(layers))

    @staticmethod
    def share_one_buffer(layers: list["Int4Linear"]) -> None:
        """Move the layers' packed weights, then their group parameters, side by side into one buffer each on 2 MiB
        pages (weight_memory.side_by_side): the same bytes, fewer TLB misses when a step reads a few of many small
        layers (a MoE layer's chosen experts). CPU layers in the tile layout, as `pairs_run_in_kernel` accepts."""
        for name in ("packed", "group_params"):
            for layer, copy in zip(layers, weight_memory.side_by_side([getattr(layer, name) for layer in layers])):
                setattr(layer, name, copy)

    @staticmethod
    def pair_operands(layers: list["Int4Linear"]) -> tuple[list[torch.Tensor], list[torch.Tensor], int, int]:
        """(packed, params of every layer, group size, out features): what `products_by_pair` hands the pair
        kernel, for layers `pairs_run_in_kernel` accepts (a compiled decode stack's MoE experts)."""
        first = layers[0]
        return ([layer.packed for layer in layers], [layer.group_params for layer in layers], first.group_size,
                first.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4 group {self.group_size}, "
                f"{self.layout} layout" + (", Q4_K super-blocks" if self.super_blocks else ""))
