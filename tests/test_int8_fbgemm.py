"""int8 layers in fbgemm's packed layout (qwenvl/layers/int8_vnni.py): the same products as the plain int8
layer's dequantised weights, rows independent of each other, one copy of the weights, chosen per CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenvl import LLM, SamplingParams
from qwenvl.layers import int8_vnni
from qwenvl.layers.quantized_linear import Int8Linear

pytestmark = pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines,
                                reason="this PyTorch build has no fbgemm")


def _layers(dtype, in_f=256, out_f=96, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias).to(dtype)
    plain = Int8Linear.from_float(lin)
    packed = Int8Linear.from_float(lin)
    packed.use_fbgemm_layout()
    return plain, packed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_fbgemm_layer_equals_the_dequantised_product(dtype, rows):
    plain, packed = _layers(dtype)
    x = torch.randn(rows, 256, dtype=dtype)
    x[:, 5] *= 300                               # one outlier channel: the activation split must not lose the rest
    ref = F.linear(x.double(), plain.dequantize().double(), plain.bias.double())
    got = packed(x)
    assert got.dtype == dtype and got.shape == (rows, 96)
    # float32: the split is finer than float32 arithmetic; bf16: the output's own rounding (2^-8) dominates
    tol = 2e-6 if dtype == torch.float32 else 8e-3
    err = (got.double() - ref).abs().max() / ref.abs().max()
    assert err < tol, err


def test_a_rows_result_does_not_depend_on_its_batch():
    _, packed = _layers(torch.bfloat16)
    x = torch.randn(6, 256, dtype=torch.bfloat16)
    x[2] *= 1000                                 # a neighbour with a far larger range
    batched = packed(x)
    for i in range(6):
        assert torch.equal(packed(x[i:i + 1]), batched[i:i + 1])


def test_an_all_zero_row_gives_the_bias():
    _, packed = _layers(torch.bfloat16)
    y = packed(torch.zeros(2, 256, dtype=torch.bfloat16))
    assert torch.equal(y, packed.bias.expand(2, -1))


def test_the_layout_keeps_one_copy_and_dequantises_exactly():
    plain, packed = _layers(torch.bfloat16, out_f=192)
    assert packed.qweight is None and "qweight" not in packed.state_dict()
    assert packed.packed_weight_bytes == 192 * 256 and plain.packed_weight_bytes == 0
    assert torch.equal(packed.dequantize(), plain.dequantize())
    assert "fbgemm layout" in repr(packed)


def test_the_layout_is_chosen_per_cpu_and_can_be_forced(monkeypatch):
    for forced in ("plain", "fbgemm"):
        monkeypatch.setenv(int8_vnni.LAYOUT_ENV, forced)
        int8_vnni.int8_layout.cache_clear()
        assert int8_vnni.int8_layout() == forced
    monkeypatch.setenv(int8_vnni.LAYOUT_ENV, "vnni")
    int8_vnni.int8_layout.cache_clear()
    with pytest.raises(ValueError, match="QWENVL_INT8_LAYOUT='vnni'"):
        int8_vnni.int8_layout()
    monkeypatch.delenv(int8_vnni.LAYOUT_ENV)
    int8_vnni.int8_layout.cache_clear()
    vnni_without_amx = torch.cpu._is_vnni_supported() and not torch.cpu._is_amx_tile_supported()
    assert int8_vnni.int8_layout() == ("fbgemm" if vnni_without_amx else "plain")
    int8_vnni.int8_layout.cache_clear()


def _int8_llm(checkpoint, layout, monkeypatch) -> LLM:
    monkeypatch.setenv(int8_vnni.LAYOUT_ENV, layout)
    int8_vnni.int8_layout.cache_clear()
    try:
        return LLM(checkpoint, quantization="int8", dtype="float32")
    finally:
        int8_vnni.int8_layout.cache_clear()


def test_an_int8_model_loads_into_either_layout_and_answers_alike(tiny_checkpoint, monkeypatch):
    """Both layouts through the engine: every int8 layer in the chosen one, and the same greedy tokens (the
    products differ far less than the tiny model's top-2 logit gaps on this prompt)."""
    msgs = [{"role": "user", "content": "count to five"}]
    answers = {}
    for layout in ("plain", "fbgemm"):
        llm = _int8_llm(tiny_checkpoint("qwen2_vl"), layout, monkeypatch)
        layers = [m for m in llm.engine.model.modules() if isinstance(m, Int8Linear)]
        assert layers and all((m.packed_weight_bytes > 0) == (layout == "fbgemm") for m in layers)
        answers[layout] = llm.chat(msgs, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)).token_ids
    assert answers["plain"] == answers["fbgemm"] and len(answers["plain"]) == 6


def test_a_quantised_vision_tower_keeps_the_plain_layout(tiny_checkpoint, monkeypatch):
    monkeypatch.setenv(int8_vnni.LAYOUT_ENV, "fbgemm")
    int8_vnni.int8_layout.cache_clear()
    try:
        llm = LLM(tiny_checkpoint("qwen2_vl"), quantization="int8", quantize_vision=True, dtype="float32")
    finally:
        int8_vnni.int8_layout.cache_clear()
    layers = {n: m for n, m in llm.engine.model.named_modules() if isinstance(m, Int8Linear)}
    vision = [m for n, m in layers.items() if n.startswith("model.visual.")]
    language = [m for n, m in layers.items() if not n.startswith("model.visual.")]
    assert vision and all(m.packed_weight_bytes == 0 for m in vision)
    assert language and all(m.packed_weight_bytes > 0 for m in language)


def test_where_fbgemm_is_chosen_only_the_large_layers_move_into_it(tiny_checkpoint, monkeypatch):
    """Chosen automatically (not forced), fbgemm's layout takes the layers of at least FBGEMM_MIN_WEIGHTS
    weights; the smaller ones keep the plain layout, whose decode product costs fewer ops around it. (Only
    where qwenvl's kernels do not run: where they do, every layer takes their tiles.)"""
    monkeypatch.delenv(int8_vnni.LAYOUT_ENV, raising=False)
    monkeypatch.setenv("QWENVL_KERNELS", "off")

    def language_layers(layout: str) -> list[Int8Linear]:
        monkeypatch.setattr(int8_vnni, "int8_layout", lambda: layout)
        llm = LLM(tiny_checkpoint("qwen2_vl"), quantization="int8", dtype="float32")
        return [m for n, m in llm.engine.model.named_modules()
                if isinstance(m, Int8Linear) and not n.startswith("model.visual.")]

    sizes = sorted({m.out_features * m.in_features for m in language_layers("plain")})
    threshold = sizes[len(sizes) // 2]                  # splits the model's layers into both kinds
    monkeypatch.setattr(int8_vnni, "FBGEMM_MIN_WEIGHTS", threshold)
    layers = language_layers("fbgemm")
    packed = [m.packed_weight_bytes > 0 for m in layers]
    assert any(packed) and not all(packed)
    assert packed == [m.out_features * m.in_features >= threshold for m in layers]
