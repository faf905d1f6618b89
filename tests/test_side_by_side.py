"""q/k/v and gate/up stacked into one product (qwenvl/layers/side_by_side.py): the same outputs as the separate
layers for every kind that stacks, a refusal for those that cannot, and the engine's model fused."""

from __future__ import annotations

import pytest
import torch

from qwenvl import LLM, SamplingParams
from qwenvl.layers.quantized_linear import Int4Linear, Int8Linear
from qwenvl.layers.side_by_side import SideBySide, fuse, outputs, stack_linears
from qwenvl.checkpoints import loader
from qwenvl.checkpoints.loader import load_model
from qwenvl.checkpoints.quantize import quantized_linear

SIZES = (128, 64, 64)


def _floats(bias=True):
    torch.manual_seed(0)
    return [torch.nn.Linear(256, n, bias=bias) for n in SIZES]


def _kinds():
    return {
        "float": _floats(),
        "float, bias on one only": [torch.nn.Linear(256, n, bias=i == 0) for i, n in enumerate(SIZES)],
        "int8": [quantized_linear(m.weight.detach(), m.bias.detach(), "int8") for m in _floats()],
        "int4": [quantized_linear(m.weight.detach(), m.bias.detach(), "int4", 64) for m in _floats()],
    }


@pytest.mark.parametrize("kind", list(_kinds()))
def test_stacked_outputs_equal_the_separate_layers(kind):
    layers = _kinds()[kind]
    holder = torch.nn.Module()
    for name, layer in zip("qkv", layers):
        setattr(holder, name, layer)
    x = torch.randn(5, 256)
    with torch.no_grad():
        separate = outputs(holder, x, ("q", "k", "v"), "qkv")
        assert fuse(holder, ("q", "k", "v"), "qkv")
        fused = outputs(holder, x, ("q", "k", "v"), "qkv")
    assert isinstance(holder.qkv, SideBySide) and not hasattr(holder, "q")
    assert type(holder.qkv.layer) is type(layers[0])
    for a, b in zip(separate, fused):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_layers_that_cannot_stack_are_left_alone():
    mixed = [torch.nn.Linear(256, 64), quantized_linear(torch.randn(64, 256), None, "int8")]
    assert stack_linears(mixed) is None
    assert stack_linears([torch.nn.Linear(256, 64), torch.nn.Linear(128, 64)]) is None
    padded = [quantized_linear(torch.randn(24, 256), None, "int4", 64) for _ in range(2)]   # 24 rows pad to 32 / 64
    assert all(isinstance(m, Int4Linear) for m in padded) and stack_linears(padded) is None
    if "fbgemm" in torch.backends.quantized.supported_engines:         # an int8 layer already packed
        packed = [Int8Linear.from_float(torch.nn.Linear(256, 64)) for _ in range(2)]
        packed[0].use_fbgemm_layout()
        assert stack_linears(packed) is None
    holder = torch.nn.Module()
    holder.a, holder.b = mixed
    assert not fuse(holder, ("a", "b"), "ab") and hasattr(holder, "a") and not hasattr(holder, "ab")


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_the_engine_fuses_and_answers_as_the_unfused_model(tiny_checkpoint, monkeypatch, quantization):
    ckpt = tiny_checkpoint("qwen2_vl")
    msgs = [{"role": "user", "content": "hello there"}]
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    fused = LLM(ckpt, dtype="float32", quantization=quantization)
    names = {n.rsplit(".", 1)[-1] for n, _ in fused.engine.model.named_modules()}
    assert {"qkv_proj", "gate_up_proj"} <= names and not {"q_proj", "gate_proj"} & names
    monkeypatch.setattr(loader, "fuse_side_by_side", lambda model, after_each: 0)
    unfused = LLM(ckpt, dtype="float32", quantization=quantization)
    assert any(n.endswith("q_proj") for n, _ in unfused.engine.model.named_modules())
    assert fused.chat(msgs, greedy).token_ids == unfused.chat(msgs, greedy).token_ids
    # training and the parity tests load without fusing
    reference, _ = load_model(ckpt, dtype="float32")
    assert not any(n.endswith("qkv_proj") for n, _ in reference.named_modules())
