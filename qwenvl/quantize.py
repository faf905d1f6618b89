"""Weight-only quantisation as a module swap after load (gpt-fast's shape): the model files stay unaware.

`quantize_model(model, "int8" | "int4")` replaces every nn.Linear of the language model, and the output
head, with the quantised layer of the same interface (qwenvl/layers/quantized_linear.py). The vision tower
stays in its float dtype unless asked: it runs once per image over hundreds of rows, where the work is
compute bound and a quantised weight saves nothing. A tied output head is quantised as a copy of the
embedding; the embedding lookup itself stays exact.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers.quantized_linear import Int4Linear, Int8Linear, int4_group_size, quantize_int4, quantize_int8

QUANTIZATION_MODES = ("int8", "int4")
_LANGUAGE_PREFIXES = ("model.language_model.", "lm_head")
_VISION_PREFIX = "model.visual."


def check_quantization(mode: str | None) -> str | None:
    """None, "none" or "" -> None; a known mode -> itself; anything else -> ValueError naming the choices."""
    if mode in (None, "", "none"):
        return None
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"quantization={mode!r} is not supported; use one of {', '.join(QUANTIZATION_MODES)} "
                         "(or None for the checkpoint's own dtype)")
    return mode


def quantized_linear(weight: torch.Tensor, bias: torch.Tensor | None, mode: str, group_size: int = 128
                     ) -> nn.Module:
    """The quantised twin of the linear weight[out, in] (+ bias). int4 needs a group size dividing in_features
    (32, 64, 128 or 256): a layer too narrow for any (tiny test models) falls back to int8."""
    if mode == "int4":
        g = int4_group_size(weight.shape[1], group_size)
        if g is not None:
            return Int4Linear.from_int4(*quantize_int4(weight, g), g, bias)
    return Int8Linear.from_int8(*quantize_int8(weight), bias)


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, group_size: int = 128, include_vision: bool = False) -> nn.Module:
    """Swap the linears in place, one at a time (each float weight is freed as soon as its twin exists,
    so peak memory stays near the larger of the two models); returns `model`."""
    mode = check_quantization(mode)
    if mode is None:
        return model
    prefixes = _LANGUAGE_PREFIXES + ((_VISION_PREFIX,) if include_vision else ())
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.startswith(prefixes)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantized_linear(linear.weight, linear.bias, mode, group_size))
    tied = model.tied_output_weight()
    if tied is not None:
        model.use_output_head(quantized_linear(tied, None, mode, group_size))
    return model
