"""Quantised experts: each expert's two matrices become quantised linears (int8, or int4 in groups), run
by the same kernels as every other quantised layer. Routing is unchanged (the router stays float).

Tokens are grouped by expert as in the float block. At decode with int4 experts on qwenvl's kernels, the
(token, expert) pairs instead run as two multi-weight kernel calls (all chosen gate/up products in one
parallel pass, then all down products), one silu * up between them and the weighted sum in float32: a call
per expert cost two thread wake-ups and ~8 PyTorch ops per chosen expert, more than the products' own reads
(bench/moe_vs_dense.py --quantization int4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .activations import silu_mul
from .moe import grouped_by_expert
from .quantized_linear import Int4Linear

# (token, expert) pairs up to which decode runs pair by pair in the int4 kernel (a decode batch of 8 tokens,
# k = 8). A pair reads its expert's weights for its token alone, so a larger batch, where tokens share
# experts, reads less grouped by expert.
PAIR_KERNEL_MAX_PAIRS = 64


class QuantizedExperts(nn.Module):
    """Same interface as `Experts`: forward(x[N, H], weights[N, k], ids[N, k]) -> [N, H]."""

    def __init__(self, gate_up: list[nn.Module], down: list[nn.Module], intermediate: int):
        super().__init__()
        if len(gate_up) != len(down):
            raise ValueError(f"{len(gate_up)} gate_up and {len(down)} down expert layers")
        self.num_experts, self.intermediate = len(gate_up), intermediate
        self.gate_up = nn.ModuleList(gate_up)      # expert e: [2I, H] as a quantised linear
        self.down = nn.ModuleList(down)            # expert e: [H, I]
        # plain lists of the experts, when all are int4 layers the pair kernel takes (decided at first use:
        # the loaders fill these modules' tensors after construction, they do not replace the modules)
        self._pair_experts: tuple[list[nn.Module], list[nn.Module]] | None = None
        self._pairs_checked = False

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() <= PAIR_KERNEL_MAX_PAIRS and x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float32) \
                and x.device.type == "cpu" and x.is_contiguous() and self._kernel_pairs() is not None \
                and kernels.available():
            return self._by_pair(x, weights, ids)
        return self._grouped(x, weights, ids)

    def gather_weights(self) -> bool:
        """Where the pair kernel runs these experts: their weights side by side on 2 MiB pages
        (Int4Linear.share_one_buffer), the loader's last step; whether they moved."""
        pairs = self._kernel_pairs()
        if pairs is None or pairs[0][0].packed.device.type != "cpu":
            return False
        for layers in pairs:
            Int4Linear.share_one_buffer(layers)
        return True

    def decode_experts(self) -> tuple | None:
        """For a compiled decode stack: the pair kernel's operands of every expert (its _by_pair path, up to
        PAIR_KERNEL_MAX_PAIRS pairs), or None where the experts are not all int4 layers the pair kernel takes."""
        pairs = self._kernel_pairs()
        if pairs is None:
            return None
        gate_up, down = pairs
        return ("moe_pairs", *Int4Linear.pair_operands(gate_up), *Int4Linear.pair_operands(down),
                PAIR_KERNEL_MAX_PAIRS)

    def _kernel_pairs(self) -> tuple[list[nn.Module], list[nn.Module]] | None:
        if not self._pairs_checked:
            gate_up, down = list(self.gate_up), list(self.down)
            if Int4Linear.pairs_run_in_kernel(gate_up) and Int4Linear.pairs_run_in_kernel(down):
                self._pair_experts = (gate_up, down)
            self._pairs_checked = True
        return self._pair_experts

    def _by_pair(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Every (token, expert) pair in two int4 kernel calls; the k terms of a token summed in float32 in
        the router's order (as the float block's decode path sums them)."""
        gate_up_layers, down_layers = self._pair_experts
        tokens, k = ids.shape
        chosen = ids.reshape(-1).tolist()
        gate_up = Int4Linear.products_by_pair([gate_up_layers[e] for e in chosen], x,
                                              [t for t in range(tokens) for _ in range(k)])      # [P, 2I]
        h = silu_mul(gate_up)                                                                 # [P, I]
        y = Int4Linear.products_by_pair([down_layers[e] for e in chosen], h, list(range(len(chosen))))
        return (y.float().view(tokens, k, -1) * weights.float().unsqueeze(-1)).sum(dim=1).to(x.dtype)

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
            gate, up = self.gate_up[e](rows).split(self.intermediate, dim=-1)
            return self.down[e](F.silu(gate) * up)
        return grouped_by_expert(x, weights, ids, self.num_experts, expert)
