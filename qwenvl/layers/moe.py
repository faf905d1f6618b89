"""Sparse mixture-of-experts MLP (Qwen3-VL-MoE): a float32 softmax router picks k experts per token, their
weights are renormalised over the chosen k, and only the chosen experts run.

Expert weights live as fused 3D tensors in [E, out, in] layout (what transformers 5.x keeps in memory):
gate_up_proj [E, 2*I, H] (gate rows first, then up), down_proj [E, H, I]. Two compute plans:
  * few tokens (decode): one pair of matrix-vector products per chosen (token, expert), on views of the
    fused tensors, so only the N*k chosen experts' weights are read, once;
  * many tokens (prefill): sort token slots by expert and run one matrix product per expert that was hit;
    experts no token chose are never touched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import decode_stack

# At or below this many (token, expert) pairs the gather plan reads less memory than the grouped plan.
GATHER_MAX_PAIRS = 16


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits[N, E] -> (weights[N, k] in the logits' dtype, expert ids[N, k]).

    Softmax in float32, torch.topk on the probabilities (so ties break exactly as the reference's), then the k
    weights are renormalised to sum to one.
    """
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    top, ids = torch.topk(probs, top_k, dim=-1)
    top = top / top.sum(dim=-1, keepdim=True)
    return top.to(logits.dtype), ids


class Experts(nn.Module):
    """E SwiGLU experts as two fused 3D parameters; `forward` runs only the (token, expert) pairs given."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.num_experts, self.intermediate = num_experts, intermediate
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))   # [E, 2I, H]
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))          # [E, H, I]

    def decode_experts(self) -> tuple:
        """For a compiled decode stack: its gathered path on the fused weights, up to GATHER_MAX_PAIRS pairs."""
        return ("moe_float", self.gate_up_proj, self.down_proj, GATHER_MAX_PAIRS)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x[N, H], weights[N, k], ids[N, k] -> sum over k of weight * expert(x), [N, H]."""
        if ids.numel() <= GATHER_MAX_PAIRS:
            return self._gathered(x, weights, ids)
        return self._grouped(x, weights, ids)

    def _swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return F.silu(gate) * up

    def _gathered(self, x, weights, ids) -> torch.Tensor:
        """Few (token, expert) pairs: each pair's two matrix-vector products straight on the expert's weight
        views. Indexing the fused tensors with the ids instead copied the chosen experts' matrices first
        (read, write, read again: bench/moe_vs_dense.py measured 0.30x of the dense twin's decode)."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)    # the k terms summed in float32
        chosen = weights.tolist()
        for t, experts in enumerate(ids.tolist()):
            row = x[t:t + 1]
            for j, e in enumerate(experts):
                if chosen[t][j] == 0:
                    continue                          # weight 0: another rank's expert (tensor parallel)
                h = self._swiglu(F.linear(row, self.gate_up_proj[e]))   # [1, I]
                out[t:t + 1] += F.linear(h, self.down_proj[e]).float() * chosen[t][j]
        return out.to(x.dtype)

    def _grouped(self, x, weights, ids) -> torch.Tensor:
        def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
            h = self._swiglu(F.linear(rows, self.gate_up_proj[e]))       # [n, I]
            return F.linear(h, self.down_proj[e])                       # [n, H]
        return grouped_by_expert(x, weights, ids, self.num_experts, expert)


def grouped_by_expert(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, num_experts: int,
                      expert) -> torch.Tensor:
    """Sort the (token, expert) slots by expert and call `expert(e, x_rows[n, H]) -> [n, H]` once per expert
    that some token chose (never for the others); -> the weighted sum per token, [N, H]."""
    k = ids.shape[1]
    flat = ids.reshape(-1)                                               # [N*k] slot -> expert
    order = torch.argsort(flat, stable=True)                             # slots grouped by expert
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    tokens = order // k                                                  # token of each sorted slot
    slot_w = weights.reshape(-1)[order].unsqueeze(-1)                    # [N*k, 1]
    out = torch.zeros_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue                                                     # no token chose expert e
        rows = tokens[start:start + n]
        y = expert(e, x[rows]) * slot_w[start:start + n]
        out.index_add_(0, rows, y.to(out.dtype))
        start += n
    return out


class SparseMoeBlock(nn.Module):
    """`mlp.gate` (router, [E, H]) + `mlp.experts`; the checkpoint names of Qwen3-VL-MoE."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int):
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok={top_k} must be in 1..num_experts={num_experts}")
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = Experts(num_experts, hidden, intermediate)

    def decode_mlp(self) -> tuple | None:
        """This block for a compiled decode stack (layers/decode_stack.py): the router's product, top_k and the
        experts' decode form (their decode_experts()), or None."""
        offer = getattr(self.experts, "decode_experts", None)
        experts, router = (None if offer is None else offer()), decode_stack.product_of(self.gate)
        if experts is None or router is None:
            return None
        kind, *parts = experts
        return (kind, router, self.top_k, *parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k)
        return self.experts(x, weights, ids)
