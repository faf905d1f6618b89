"""The compiled decode stack (qwenvl/layers/decode_stack.py, csrc/decode_stack.cpp): a decode step of the Qwen2
language model in one call gives the bytes of the layers' own calls, and every step it cannot take keeps them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qwenvl import kernels
from qwenvl.layers.paged_attention import PagedAttention, PagedKVPool
from qwenvl.models.qwen2_vl.text import DecoderLayer
from qwenvl.models.qwen3_vl.text import DecoderLayer as Qwen3DecoderLayer
from kernel_fixtures import compiled  # noqa: F401  (fixture: the compiled kernels, or a failed build fails here)


def _load(tiny_checkpoint, family="qwen2_vl", dtype="bfloat16", quantization=None):
    from qwenvl.checkpoints.loader import load_model
    from qwenvl.checkpoints.quantize import LoadQuantizer
    model, _ = load_model(tiny_checkpoint(family), dtype=dtype, fuse=True,
                          quantizer=LoadQuantizer(quantization) if quantization else None)
    return model


def _decode(model, sequences: int, steps: int = 6, prefill: int = 2, seed: int = 3) -> torch.Tensor:
    """logits [steps, sequences, V]: `sequences` sequences fed one token a step through a paged pool after a first
    chunk (one prefill step) of `prefill` + s tokens for sequence s (so context lengths differ), their blocks
    interleaved."""
    cfg = model.cfg.text
    dtype = next(model.parameters()).dtype
    block, per_seq = 4, (prefill + steps + sequences) // 4 + 1
    pool = PagedKVPool(cfg.num_hidden_layers, sequences * per_seq, block, cfg.num_key_value_heads, cfg.head_dim,
                       dtype=dtype)
    tables = [[b * sequences + s for b in range(per_seq)] for s in range(sequences)]
    ids = torch.randint(0, 300, (sequences, prefill + steps + sequences), generator=torch.Generator().manual_seed(seed))
    lens = [s + prefill for s in range(sequences)]          # tokens already in the cache
    out = []
    with torch.inference_mode():
        attn = PagedAttention(pool, tables, lens, lens)
        tok = torch.cat([ids[s, :n] for s, n in enumerate(lens)])
        model(tok, torch.cat([torch.arange(n) for n in lens]).expand(3, -1), attn, None, [])
        for _ in range(steps):
            attn = PagedAttention(pool, tables, [n + 1 for n in lens], [1] * sequences)
            tok = torch.stack([ids[s, n] for s, n in enumerate(lens)])
            pos = torch.tensor(lens).expand(3, -1)
            out.append(model.compute_logits(model(tok, pos, attn, None, [])))
            lens = [n + 1 for n in lens]
    return torch.stack(out)


def _layer_calls(monkeypatch) -> list:
    """Counts the decoder layers' forward calls (the layers' own path), both families' layer classes."""
    calls = []
    for cls in (DecoderLayer, Qwen3DecoderLayer):
        monkeypatch.setattr(cls, "forward", lambda self, *a, _real=cls.forward, **k: calls.append(1) or _real(self, *a, **k))
    return calls


def _stack_vs_layers(model, monkeypatch, sequences: int, **kw) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    calls = _layer_calls(monkeypatch)
    monkeypatch.delenv(kernels.DECODE_STACK_ENV, raising=False)
    got = _decode(model, sequences, **kw)
    stacked_calls = len(calls)
    calls.clear()
    monkeypatch.setenv(kernels.DECODE_STACK_ENV, "off")
    want = _decode(model, sequences, **kw)
    monkeypatch.delenv(kernels.DECODE_STACK_ENV)
    return got, want, stacked_calls, len(calls)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_a_decode_step_in_one_call_gives_the_layers_bytes(tiny_checkpoint, monkeypatch, dtype, quantization):
    """Three sequences of different lengths (a first chunk of prefill, then six decode steps): with the stack,
    no decode step goes through the layers' forward, and the logits are the layers' path's bit for bit (the
    same kernel calls in the same order on the same tensors)."""
    model = _load(tiny_checkpoint, dtype=dtype, quantization=quantization)
    layers = model.cfg.text.num_hidden_layers
    got, want, stacked_calls, layer_calls = _stack_vs_layers(model, monkeypatch, 3, prefill=5)
    assert stacked_calls == layers                  # the prefill chunk only
    assert layer_calls == 7 * layers
    assert torch.equal(got, want)


@pytest.mark.parametrize("family,quantization", [("qwen2_5_vl", "int8"), ("qwen3_vl", None), ("qwen3_vl", "int8"),
                                                  ("qwen3_vl", "int4"), ("qwen3_vl_moe", None),
                                                  ("qwen3_vl_moe", "int4")])
def test_the_other_families_take_it_too(tiny_checkpoint, monkeypatch, family, quantization):
    """Qwen2.5-VL (Qwen2-VL's decoder); Qwen3-VL, whose q and k are normed per head and rotated by
    rotary.rotate; Qwen3-VL-MoE, its router and experts as the block's decode path runs them (float experts:
    each pair on the fused weights; int4 experts: the pair kernel): bit for bit the layers' path."""
    model = _load(tiny_checkpoint, family=family, quantization=quantization)
    got, want, stacked_calls, layer_calls = _stack_vs_layers(model, monkeypatch, 3)
    layers = model.cfg.text.num_hidden_layers
    assert stacked_calls == layers and layer_calls == 7 * layers
    assert torch.equal(got, want)


def test_moe_steps_beyond_the_experts_decode_path_keep_the_layers(tiny_checkpoint, monkeypatch):
    """Float experts run pair by pair up to 16 (token, expert) pairs (moe.GATHER_MAX_PAIRS), grouped by expert
    beyond: with top-2, a step of 9 sequences keeps the layers' path (and their answers)."""
    model = _load(tiny_checkpoint, family="qwen3_vl_moe")
    layers = model.cfg.text.num_hidden_layers
    got, want, stacked_calls, layer_calls = _stack_vs_layers(model, monkeypatch, 9, steps=2)
    assert stacked_calls == layer_calls == 3 * layers and torch.equal(got, want)
    got, want, stacked_calls, layer_calls = _stack_vs_layers(model, monkeypatch, 8, steps=2)
    assert stacked_calls == layers and torch.equal(got, want)


@pytest.mark.parametrize("quantization,stacked", [("int8", True), (None, True), ("int4", False)])
def test_rows_beyond_a_products_kernel(tiny_checkpoint, monkeypatch, quantization, stacked):
    """20 sequences a step: int8 runs them as two 16-row kernel calls, bf16 past the bf16 kernel's 4 rows as
    at::linear, both in the stack as in the layers; an int4 layer leaves its kernel past 16 rows, so the step
    keeps the layers' path."""
    model = _load(tiny_checkpoint, quantization=quantization)
    layers = model.cfg.text.num_hidden_layers
    got, want, stacked_calls, layer_calls = _stack_vs_layers(model, monkeypatch, 20, steps=2)
    assert stacked_calls == (layers if stacked else 3 * layers) and layer_calls == 3 * layers
    assert torch.equal(got, want)


def test_steps_it_cannot_take_keep_the_layers(tiny_checkpoint, monkeypatch):
    """Kernels off, decode ops off or autograd on: every step through the layers."""
    model = _load(tiny_checkpoint, quantization="int8")
    layers = model.cfg.text.num_hidden_layers
    calls = _layer_calls(monkeypatch)
    for env in (kernels.MODE_ENV, kernels.DECODE_OPS_ENV):
        monkeypatch.setenv(env, "off")
        _decode(model, 2, steps=2)
        monkeypatch.delenv(env)
        assert len(calls) == 3 * layers
        calls.clear()
    text = model.model.language_model
    x = torch.zeros(1, model.cfg.text.hidden_size, dtype=torch.bfloat16)
    with torch.enable_grad():                      # training: the stack declines before looking further
        assert text.compiled_decode.run(text.layers, x, None, None, None, 4, 2, 32) is None


def test_a_module_swapped_in_makes_a_new_stack_or_none(tiny_checkpoint, monkeypatch):
    """The stack is made from the modules there at the first decode step; a product module replaced later (new
    weights, or a wrapper the stack cannot run, as a LoRA adapter) is seen at the next step."""
    model = _load(tiny_checkpoint)
    text = model.model.language_model
    _decode(model, 1, steps=1)
    first = text.compiled_decode._stack
    assert first is not None
    attn = text.layers[1].self_attn
    replaced = nn.Linear(attn.o_proj.in_features, attn.o_proj.out_features, bias=False).bfloat16()
    attn.o_proj = replaced
    got, want, stacked_calls, _ = _stack_vs_layers(model, monkeypatch, 2)
    assert stacked_calls == model.cfg.text.num_hidden_layers and torch.equal(got, want)
    assert text.compiled_decode._stack is not first

    class Wrapped(nn.Module):                      # forward does more than its inner layer's product
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 2
    attn.o_proj = Wrapped(replaced)
    got, want, stacked_calls, layer_calls = _stack_vs_layers(model, monkeypatch, 2)
    assert stacked_calls == layer_calls and torch.equal(got, want)


def test_a_copied_model_makes_its_own_stack(tiny_checkpoint):
    model = _load(tiny_checkpoint, quantization="int8")
    want = _decode(model, 2, steps=2)
    twin = copy.deepcopy(model)
    assert twin.model.language_model.compiled_decode._stack is None
    assert torch.equal(_decode(twin, 2, steps=2), want)
    assert twin.model.language_model.compiled_decode._stack is not model.model.language_model.compiled_decode._stack


def test_bad_stacks_are_clear_errors():
    w = torch.zeros(16, 16)
    product = ("linear", w, None, None, 16, 0, 0)
    stack = kernels.decode_stack(1, 1, 16)
    with pytest.raises(RuntimeError, match="unknown product kind"):
        stack.add_layer(w[0], w[0], 1e-6, ("int3", w, None, None, 16, 0, 0), product, None, None, 0.0)
    with pytest.raises(RuntimeError, match="q/k/v or o product does not match"):
        kernels.decode_stack(2, 1, 16).add_layer(w[0], w[0], 1e-6, product, product, None, None, 0.0)
    wide = ("linear", torch.zeros(48, 16), None, None, 48, 0, 0)
    stack.add_layer(w[0], w[0], 1e-6, wide, product, None, None, 0.0)
    with pytest.raises(RuntimeError, match="has no MLP"):
        stack.max_rows
    with pytest.raises(RuntimeError, match="no layer 3"):
        stack.set_dense_mlp(3, product, product)
    with pytest.raises(RuntimeError, match=r"\[E, 2I, H\]"):
        stack.set_moe_float(0, product, 2, torch.zeros(4, 8, 16), torch.zeros(4, 16, 8), 16)
