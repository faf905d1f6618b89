"""The language model's layers split over the ranks of one tensor-parallel group (comm.py).

Each sharded layer says which slice of its checkpoint tensors it holds (`checkpoint_slice(name)` ->
(dim, start, stop, full size) or None for a replicated tensor), so a rank reads only its slice.

  * ColumnParallelLinear: rows [start, stop) of the output (q/k/v heads, gate/up columns); no communication.
  * RowParallelLinear: columns [start, stop) of the input (o_proj, down_proj); partial products are summed
    with one all_reduce, then the (replicated) bias is added once.
  * VocabParallelEmbedding: rows [start, stop) of the vocabulary; each rank looks up its own ids, zeros the
    rest, and one all_reduce sums them (exact: every row comes from one rank, the others add zeros).
  * VocabParallelHead: the logits of the rank's vocabulary rows, all-gathered into the full [N, V].
  * ParallelExperts: whole MoE experts per rank; the weighted outputs summed with one all_reduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.moe import GATHER_MAX_PAIRS, Experts, grouped_by_expert
from .comm import Communicator


def split_range(total: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s share of `total` items, ceil-sized shares (the last one may be shorter)."""
    per = -(-total // world)
    start = min(total, rank * per)
    return start, min(total, start + per)


class ColumnParallelLinear(nn.Linear):
    def __init__(self, in_features: int, full_out: int, out_range: tuple[int, int], bias: bool):
        super().__init__(in_features, out_range[1] - out_range[0], bias=bias)
        self.full_out = full_out
        self.out_range = out_range

    def checkpoint_slice(self, name: str) -> tuple[int, int, int, int]:
        return (0, *self.out_range, self.full_out)          # weight [out, in] and bias [out]: rows


class RowParallelLinear(nn.Linear):
    def __init__(self, full_in: int, in_range: tuple[int, int], out_features: int, bias: bool,
                 comm: Communicator):
        super().__init__(in_range[1] - in_range[0], out_features, bias=bias)
        self.comm = comm
        self.full_in = full_in
        self.in_range = in_range

    def checkpoint_slice(self, name: str) -> tuple[int, int, int, int] | None:
        return (1, *self.in_range, self.full_in) if name == "weight" else None   # the bias is whole

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)                                        # [N, out] partial sum
        self.comm.all_reduce(out)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, vocab_size: int, dim: int, vocab_range: tuple[int, int], comm: Communicator):
        super().__init__(vocab_range[1] - vocab_range[0], dim)
        self.comm = comm
        self.vocab_size = vocab_size
        self.vocab_range = vocab_range

    def checkpoint_slice(self, name: str) -> tuple[int, int, int, int]:
        return (0, *self.vocab_range, self.vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        start, stop = self.vocab_range
        outside = (ids < start) | (ids >= stop)                               # [N]
        local = (ids - start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0)   # [N, D]
        self.comm.all_reduce(out)
        return out


class VocabParallelHead(nn.Module):
    """logits[N, V] from this rank's vocabulary rows of the output matrix (the embedding's when tied)."""

    def __init__(self, weight: torch.Tensor, vocab_size: int, comm: Communicator):
        super().__init__()
        self.comm = comm
        self.weight = weight                                                  # [V_local, D], shared, not copied
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // comm.world)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        local = F.linear(hidden, self.weight)                                 # [N, V_local]
        if local.shape[1] < self.per_rank:                                   # the last, shorter share
            local = F.pad(local, (0, self.per_rank - local.shape[1]))
        return torch.cat(self.comm.all_gather(local.contiguous()), dim=1)[:, : self.vocab_size]   # [N, V]


class ParallelExperts(Experts):
    """Experts [start, stop) of a sparse MoE block (expert parallelism: whole experts per rank, the router
    replicated). Each rank runs the (token, expert) pairs that fall on its experts; one all_reduce sums the
    weighted outputs. Fused tensors are sliced on their expert dimension, which is dim 0 in either file layout."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, expert_range: tuple[int, int],
                 comm: Communicator):
        super().__init__(expert_range[1] - expert_range[0], hidden, intermediate)
        self.total_experts = num_experts
        self.expert_range = expert_range
        self.comm = comm

    def checkpoint_slice(self, name: str) -> tuple[int, int, int, int]:
        return (0, *self.expert_range, self.total_experts)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x[N, H], weights/ids[N, k] over all experts -> this rank's share of the sum, all-reduced [N, H]."""
        start, stop = self.expert_range
        mine = (ids >= start) & (ids < stop)                                  # [N, k]
        weights = weights.masked_fill(~mine, 0)
        if ids.numel() <= GATHER_MAX_PAIRS:
            # Few pairs (decode): another rank's pair runs local expert 0 at weight 0, cheaper than sorting.
            out = self._gathered(x, weights, torch.where(mine, ids - start, 0))
        else:
            # Many pairs: another rank's pairs go to a null expert that computes nothing.
            def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
                if e == self.num_experts:
                    return torch.zeros_like(rows)
                h = self._swiglu(F.linear(rows, self.gate_up_proj[e]))       # [n, I]
                return F.linear(h, self.down_proj[e])                         # [n, H]
            out = grouped_by_expert(x, weights, torch.where(mine, ids - start, self.num_experts),
                                    self.num_experts + 1, expert)
        self.comm.all_reduce(out)
        return out
