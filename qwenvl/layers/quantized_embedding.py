"""An embedding table in int8, one scale per row, for quantised models.

Why: the table is the largest single matrix of a small model (151936 x 1536 = 467 MB in bf16 at 2B widths,
a fifth of the language model) but each step reads only the rows of its new tokens, so its size is all
memory and no speed. The rows are quantised as an int8 layer quantises its output rows (symmetric, per
row: qwenvl/layers/quantized_linear.py), and a looked-up row is dequantised, within half a step of the
float row. A tied int8 head multiplies by these same rows (qwenvl/quantize.py).

A tied model quantised to int4 has no table of its own (`TiedInt4Embedding`): its rows are the int4 head's
rows, dequantised from the head's packed layout at lookup (the issue's "dequantises rows"), which saves the
int8 table's 233 MB at 2B widths, a tenth of an int4+vision model.

A tied int8 model starts with one int8 matrix shared by the table and the head; once the head moves into
the kernels' tiles (checkpoints/quantize.py: use_cpu_int8_layout) the table would be a second copy, so it
becomes a `TiedInt8Embedding` reading its rows from the head's tiles: the same values, 233 MB less.
"""

from __future__ import annotations

import torch
from torch import nn

from .quantized_linear import Int4Linear, Int8Linear, quantize_int8


class Int8Embedding(nn.Module):
    """nn.Embedding's lookup over int8 rows: table[ids] = qweight[ids] * scales[ids]."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.register_buffer("qweight", qweight)                 # int8 [V, D]
        self.register_buffer("scales", scales)                   # [V], the model dtype

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "Int8Embedding":
        return cls(*quantize_int8(weight.detach()))

    @classmethod
    def empty(cls, num_embeddings: int, embedding_dim: int, dtype: torch.dtype) -> "Int8Embedding":
        """Meta-device buffers of the right shapes, for the loader to fill."""
        return cls(torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device="meta"),
                   torch.empty(num_embeddings, dtype=dtype, device="meta"))

    def dequantize(self) -> torch.Tensor:
        return self.qweight.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].to(self.scales.dtype).mul_(self.scales[ids].unsqueeze(-1))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


class TiedInt4Embedding(nn.Module):
    """The embedding of a tied model whose output head is an Int4Linear: table[ids] = the head's rows ids."""

    def __init__(self, head: Int4Linear):
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        # Held in a list, not as a submodule: the weights are the head's, listed (and loaded) once, under it.
        self._head = [head]

    def dequantize(self) -> torch.Tensor:
        return self._head[0].dequantize()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._head[0].dequantized_rows(ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, the tied int4 head's rows"


class TiedInt8Embedding(nn.Module):
    """The embedding of a tied model whose output head is an Int8Linear in another layout than the shared
    plain matrix (its tiles): table[ids] = the head's rows ids, as Int8Embedding computes them."""

    def __init__(self, head: Int8Linear):
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self._head = [head]         # not a submodule: the weights are the head's, listed (and loaded) once

    def dequantize(self) -> torch.Tensor:
        return self._head[0].dequantize()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._head[0].dequantized_rows(ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, the tied int8 head's rows"
