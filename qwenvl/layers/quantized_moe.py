"""Quantised experts: each expert's two matrices become quantised linears (int8, or int4 in groups), run
by the same kernels as every other quantised layer. Routing is unchanged (the router stays float).

Tokens are grouped by expert as in the float block; at decode (one token, k experts) that is k
matrix-vector products over the chosen experts' packed weights only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .moe import grouped_by_expert


class QuantizedExperts(nn.Module):
    """Same interface as `Experts`: forward(x[N, H], weights[N, k], ids[N, k]) -> [N, H]."""

    def __init__(self, gate_up: list[nn.Module], down: list[nn.Module], intermediate: int):
        super().__init__()
        if len(gate_up) != len(down):
            raise ValueError(f"{len(gate_up)} gate_up and {len(down)} down expert layers")
        self.num_experts, self.intermediate = len(gate_up), intermediate
        self.gate_up = nn.ModuleList(gate_up)      # expert e: [2I, H] as a quantised linear
        self.down = nn.ModuleList(down)            # expert e: [H, I]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
            gate, up = self.gate_up[e](rows).split(self.intermediate, dim=-1)
            return self.down[e](F.silu(gate) * up)
        return grouped_by_expert(x, weights, ids, self.num_experts, expert)
