"""The gated activation of the SwiGLU MLPs: silu(gate) * up over the fused gate/up output.

Why a function of its own: at decode the PyTorch path is a silu and a multiply over [1, I] (~2 ops per layer
of fixed cost); on a CPU with qwenvl's kernels (csrc/decode_ops_kernel.hpp) it is one call that reads the
gate/up row once. The numbers are F.silu's then the multiply's (silu rounded to the dtype first) up to the
kernel's exp (reference.silu_mul states the bound).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels

# Rows up to which the kernel runs: a decode batch. A long prefill keeps PyTorch's in-place path, which
# holds the [N, 2I] gate/up output and nothing more (the kernel writes a new [N, I]).
SILU_MUL_KERNEL_MAX_ROWS = 64


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up[N, 2I] (gate then up) -> silu(gate) * up [N, I]. Without gradients: the PyTorch path works in
    place on gate_up's gate half."""
    if gate_up.dim() == 2 and gate_up.shape[0] <= SILU_MUL_KERNEL_MAX_ROWS and gate_up.device.type == "cpu" \
            and gate_up.stride(-1) == 1 and gate_up.dtype in (torch.float32, torch.bfloat16) \
            and not (torch.is_grad_enabled() and gate_up.requires_grad):
        isa = kernels.decode_ops_isa()
        if isa is not None:
            return kernels.silu_mul(gate_up, isa)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate, inplace=True).mul_(up)
