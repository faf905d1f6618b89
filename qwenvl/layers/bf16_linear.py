"""bfloat16 decode products through qwenvl's own kernel (qwenvl/kernels, csrc/bf16_kernel.hpp), by a class
swap after loading: the model files keep plain nn.Linear, the parameters and the state dict do not change.

Why: decode reads every weight once per token, so the product's read speed is the decode speed. PyTorch's
bf16 matrix-vector kernel reads at ~78% of the copy bandwidth; qwenvl's (AVX-512 BF16 vdpbf16ps on the
layer's own weight, several outputs and rows in registers) reads closer to it at 1 to 4 rows
(`python bench/bf16_gemv.py` measures both in one run). From more rows on, oneDNN's GEMM (AMX where the
CPU has it) catches up, so those stay F.linear, as do float32 layers, training (autograd) and other devices.
The arithmetic is F.linear's (products exact in float32, float32 sums, one rounding to bf16) in another
summation order: results differ from F.linear's by float32 rounding, and a row's result does not depend on
the other rows of its batch or on the thread count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels

BF16_KERNEL_MAX_ROWS = 4     # at most this many rows per product run the kernel (bench/bf16_gemv.py)
_LANGUAGE_PREFIXES = ("model.language_model.", "lm_head")


class Bf16DecodeLinear(nn.Linear):
    """nn.Linear whose decode products (bfloat16 on the CPU, 1..BF16_KERNEL_MAX_ROWS rows, no gradient) run
    qwenvl's bf16 kernel; every other call is F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if 0 < x.numel() <= BF16_KERNEL_MAX_ROWS * self.in_features and x.dtype == torch.bfloat16 \
                and w.dtype == torch.bfloat16 and x.device.type == "cpu" and w.stride(1) == 1 \
                and (b is None or b.dtype == torch.bfloat16) \
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)) \
                and kernels.bf16_isa() is not None:
            y = kernels.bf16_matmul(x.reshape(-1, self.in_features), w, b)
            return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, w, b)

    def decode_product(self) -> tuple:
        """This layer's decode product for a compiled decode stack (layers/decode_stack.py): the kernel up to
        BF16_KERNEL_MAX_ROWS bfloat16 rows where forward runs it, F.linear's op otherwise."""
        w, b = self.weight, self.bias
        kind = "bf16" if w.dtype == torch.bfloat16 and w.stride(1) == 1 and (b is None or b.dtype == torch.bfloat16) \
            else "linear"
        return (kind, w, None, b, self.out_features, 0, 0)


def tied_head(weight: torch.Tensor) -> Bf16DecodeLinear:
    """An output head over the embedding matrix itself (shared, not copied), for a tied model."""
    head = Bf16DecodeLinear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    head.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    return head


def use_bf16_decode_kernel(model: nn.Module) -> int:
    """Give the language model's bfloat16 CPU linears (and a tied model's head) the kernel's decode product,
    where the kernels run; returns how many layers now have it. Call it after fusing (fused q/k/v and gate/up
    are built as nn.Linear). The vision tower keeps nn.Linear: it runs hundreds of rows at once."""
    if kernels.bf16_isa() is None:
        return 0
    swapped = 0
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name.startswith(_LANGUAGE_PREFIXES) \
                and module.weight.dtype == torch.bfloat16 and module.weight.device.type == "cpu":
            module.__class__ = Bf16DecodeLinear
            swapped += 1
    # a quantised model's head is its own module already (and its embedding may hold no float table)
    tied = model.tied_output_weight() if hasattr(model, "tied_output_weight") and not model.has_output_head() else None
    if tied is not None and tied.dtype == torch.bfloat16 and tied.device.type == "cpu":
        model.use_output_head(tied_head(tied))
        swapped += 1
    return swapped
