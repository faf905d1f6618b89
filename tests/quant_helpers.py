"""Shared by the quantisation tests: logits of a bare model, and the load-time quantiser checked against
the module swap on a loaded float model."""

from __future__ import annotations

import torch

from qwenvl.layers.attention import ContiguousKVCache
from qwenvl.checkpoints.loader import load_model
from qwenvl.checkpoints.quantize import LoadQuantizer, quantize_model


def tiny_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """logits[N, V] of one text-only prompt (positions 0..N-1 on all three M-RoPE rows)."""
    n = ids.shape[0]
    with torch.inference_mode():
        hidden = model(ids, torch.arange(n).expand(3, n), ContiguousKVCache(model.cfg.text.num_hidden_layers), None, [])
        return model.compute_logits(hidden)


def streamed_equals_swapped(path, mode: str):
    """Quantise `path` while loading and by swapping the loaded float model; assert every tensor is equal
    and return the streamed model."""
    swapped, _ = load_model(path, dtype="float32")
    quantize_model(swapped, mode)
    streamed, _ = load_model(path, dtype="float32", quantizer=LoadQuantizer(mode))
    a, b = swapped.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return streamed


def activation_rounding_bound(x: torch.Tensor, w: torch.Tensor, group: int) -> torch.Tensor:
    """[R, N]: how far an int4 product through qwenvl's kernel may be from x @ w.T in exact arithmetic
    because the kernel rounds each row's group of x to int8 steps d = max|x_g| / 127 (an error of at most
    d / 2 an input): sum_g d_g / 2 * sum_{k in g} |w[n, k]| (qwenvl/kernels/reference.py has the rest)."""
    rows, k = x.shape
    d = x.float().abs().view(rows, k // group, group).amax(dim=2) / 127              # [R, G]
    wabs = w.float().abs().view(w.shape[0], k // group, group).sum(dim=2)             # [N, G]
    return d @ wabs.T / 2
