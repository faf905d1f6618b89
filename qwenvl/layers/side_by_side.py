"""Linears over the same input fused into one product: q/k/v, and an MLP's gate/up, for inference.

Why: at decode every product is one small call that reads its weights once, and each call has a fixed
cost beyond the reading (the Python call, the kernel's start, for the int8 fbgemm layout the activation
split). Stacking q/k/v into one [q + k + v, hidden] matrix and gate/up into one [2I, hidden] matrix reads the
same bytes in 2 calls instead of 5 per layer. The outputs are the same numbers: each output column is still
its own row of weights times the input (for the quantised kinds every row keeps its own scales).

The engine fuses after loading (`fuse_side_by_side`); training and the tensor-parallel shards keep the
separate layers their adapters and shards are named after.
"""

from __future__ import annotations

import torch
from torch import nn

from . import decode_stack
from .quantized_linear import Int4Linear, Int8Linear

class SideBySide(nn.Module):
    """One layer computing several linears' outputs at once; forward returns them as a tuple (views)."""

    def __init__(self, layer: nn.Module, sizes: list[int]):
        super().__init__()
        self.layer, self.sizes = layer, sizes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.layer(x).split(self.sizes, dim=-1)

    def joined(self, x: torch.Tensor) -> torch.Tensor:
        """The outputs side by side, unsplit: [..., sum(sizes)]."""
        return self.layer(x)

    def decode_product(self) -> tuple | None:
        """The stacked layer's decode product (decode_stack.product_of): what `joined` computes."""
        return decode_stack.product_of(self.layer)


def _stacked_bias(layers: list[nn.Module], sizes: list[int]) -> torch.Tensor | None:
    biases = [layer.bias for layer in layers]
    if all(b is None for b in biases):
        return None
    like = next(b for b in biases if b is not None)
    return torch.cat([b.detach() if b is not None else like.new_zeros(n) for b, n in zip(biases, sizes)])


def stack_linears(layers: list[nn.Module]) -> nn.Module | None:
    """One layer whose output is the layers' outputs concatenated, or None when they cannot be stacked
    (different kinds or widths, an int8 layer already packed, padded int4 rows, int4 input permutations)."""
    kinds = {type(layer) for layer in layers}
    if len(kinds) != 1 or len({layer.in_features for layer in layers}) != 1:
        return None
    kind, sizes = kinds.pop(), [layer.out_features for layer in layers]
    bias = _stacked_bias(layers, sizes)
    if kind is nn.Linear:
        weight = torch.cat([layer.weight.detach() for layer in layers])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        fused.weight = nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            fused.bias = nn.Parameter(bias, requires_grad=False)
        return fused
    if kind is Int8Linear and all(layer.qweight is not None for layer in layers):
        return Int8Linear.from_int8(torch.cat([layer.qweight for layer in layers]),
                                    torch.cat([layer.scales for layer in layers]), bias)
    if kind is Int4Linear:
        return Int4Linear.stacked(layers, bias)
    return None


def fuse(module: nn.Module, names: tuple[str, ...], fused_name: str) -> bool:
    """Replace module.<names> by SideBySide module.<fused_name>; False (nothing changed) if they do not stack."""
    layers = [getattr(module, name) for name in names]
    stacked = stack_linears(layers)
    if stacked is None:
        return False
    for name in names:
        delattr(module, name)
    setattr(module, fused_name, SideBySide(stacked, [layer.out_features for layer in layers]))
    return True


def outputs(module: nn.Module, x: torch.Tensor, names: tuple[str, ...], fused_name: str
            ) -> tuple[torch.Tensor, ...]:
    """The named linears' outputs for x, from the fused layer when the module has one."""
    fused = getattr(module, fused_name, None)
    if fused is not None:
        return fused(x)
    return tuple(getattr(module, name)(x) for name in names)


def joined_outputs(module: nn.Module, x: torch.Tensor, fused_name: str) -> torch.Tensor | None:
    """The fused layer's outputs side by side in one tensor, or None when the module is not fused."""
    fused = getattr(module, fused_name, None)
    return None if fused is None else fused.joined(x)


@torch.no_grad()
def fuse_side_by_side(model: nn.Module, after_each=lambda: None) -> int:
    """Fuse every module that offers it (`fuse_side_by_side()` on the attention and MLP classes), calling
    `after_each()` after each (the loader returns the freed originals' memory there); returns how many
    fused layers were made."""
    made = 0
    for module in [m for m in model.modules() if hasattr(m, "fuse_side_by_side")]:
        made += module.fuse_side_by_side()
        after_each()
    return made
