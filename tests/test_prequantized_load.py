"""Pre-quantised checkpoints (AWQ, GPTQ, FP8) through qwenvl's loader and engine, against their dequantised
float twins (issue 23 item 2). The tiny checkpoints are written in the official layouts by
tests/prequant_checkpoints.py; real ones cannot be fetched here."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from prequant_checkpoints import FORMATS, write_prequantized
from quant_helpers import tiny_logits
from qwenvl import LLM, SamplingParams
from qwenvl.layers.quantized_linear import Int4Linear, Int8Linear
from qwenvl.checkpoints.loader import LoadError, load_model
from qwenvl.checkpoints.prequantized import PrequantizedWeights
from qwenvl.checkpoints.quant_formats.awq import pack_awq
from qwenvl.checkpoints.quant_formats.spec import QuantSpec
from qwenvl.checkpoints.quantize import LoadQuantizer

# what each decoder linear becomes
LAYER_KIND = {"awq": Int4Linear, "gptq4": Int4Linear, "gptq4-actorder-asym": Int4Linear, "gptq4-v2": Int4Linear,
              "gptq8-channel": Int8Linear, "gptq8-grouped": nn.Linear, "fp8": nn.Linear, "fp8-listed": nn.Linear}
PROMPT_IDS = torch.tensor([5, 17, 33, 2, 99, 150, 7, 8, 9, 10, 11, 12])
LAYER = "model.language_model.layers.1.self_attn.q_proj"          # the layer the error tests break


@pytest.fixture(scope="module")
def written(tiny_checkpoint, tmp_path_factory):
    """written(fmt, family="qwen2_vl", legacy_names=False, sharded=False) -> (quantised folder, twin), cached."""
    root = tmp_path_factory.mktemp("prequantized")
    cache = {}

    def get(fmt, family="qwen2_vl", legacy_names=False, sharded=False):
        key = (fmt, family, legacy_names, sharded)
        if key not in cache:
            out = root / f"{family}-{'legacy' if legacy_names else 'current'}"
            out.mkdir(exist_ok=True)
            cache[key] = write_prequantized(tiny_checkpoint(family), out, fmt, legacy_names, sharded)
        return cache[key]
    return get


def _decoder_linears(model):
    return {n: m for n, m in model.named_modules()
            if n.startswith("model.language_model.layers.") and n.endswith("_proj")}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_loads_into_our_layers_with_the_dequantised_models_logits(written, fmt):
    # Qwen3-VL is the family with official FP8 uploads; the others with AWQ / GPTQ ones
    quant, twin = written(fmt, family="qwen3_vl" if fmt == "fp8-listed" else "qwen2_vl")
    model, _ = load_model(quant, dtype="float32")
    ref, _ = load_model(twin, dtype="float32")
    layers = _decoder_linears(model)
    assert len(layers) == 14 and all(type(m) is LAYER_KIND[fmt] for m in layers.values()), \
        {n: type(m).__name__ for n, m in layers.items()}
    # the vision tower and the head stay float, as the checkpoints keep them
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.startswith("model.visual.")
               and isinstance(m, (nn.Linear, Int4Linear, Int8Linear)))
    assert type(model.lm_head) is nn.Linear
    # 3 rows: PyTorch's packed int4/int8 kernels; 12 rows: the dequantised GEMM path
    for ids in (PROMPT_IDS[:3], PROMPT_IDS):
        torch.testing.assert_close(tiny_logits(model, ids), tiny_logits(ref, ids), rtol=0, atol=2e-5)


def _image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8))


@pytest.mark.parametrize("fmt", ["awq", "gptq4-actorder-asym", "gptq8-channel", "fp8"])
def test_greedy_chat_equals_the_dequantised_model(written, fmt):
    quant, twin = written(fmt)
    messages = [{"role": "user", "content": [{"image": _image()}, {"text": "describe the picture"}]}]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    got = LLM(quant, dtype="float32").chat(messages, params)
    want = LLM(twin, dtype="float32").chat(messages, params)
    assert len(got.token_ids) == 10 and got.token_ids == want.token_ids


def test_original_hub_key_names_and_modules_to_not_convert(written):
    # Qwen2.5-VL AWQ uploads: `model.layers.*` / `visual.*` keys and modules_to_not_convert ["visual"]
    quant, twin = written("awq", family="qwen2_5_vl", legacy_names=True)
    assert any(k.startswith("visual.") for k in load_file(quant / "model.safetensors"))
    model, _ = load_model(quant, dtype="float32")
    ref, _ = load_model(twin, dtype="float32")
    assert all(type(m) is Int4Linear for m in _decoder_linears(model).values())
    torch.testing.assert_close(tiny_logits(model, PROMPT_IDS), tiny_logits(ref, PROMPT_IDS), rtol=0, atol=2e-5)


@pytest.mark.parametrize("fmt", ["gptq4-actorder-asym", "fp8"])
def test_a_layers_parts_split_over_shards_load_the_same(written, fmt):
    quant, twin = written(fmt, sharded=True)
    index = json.loads((quant / "model.safetensors.index.json").read_text())["weight_map"]
    assert len({index[f"{LAYER}.{p}"] for p in ("qweight", "qzeros") if f"{LAYER}.{p}" in index} |
               {index[f"{LAYER}.{p}"] for p in ("weight", "weight_scale_inv") if f"{LAYER}.{p}" in index}) == 2
    model, _ = load_model(quant, dtype="float32")
    ref, _ = load_model(twin, dtype="float32")
    torch.testing.assert_close(tiny_logits(model, PROMPT_IDS), tiny_logits(ref, PROMPT_IDS), rtol=0, atol=2e-5)


def test_grouped_gptq8_layers_are_kept_float_with_a_note(written, caplog):
    quant, _ = written("gptq8-grouped")
    with caplog.at_level(logging.WARNING, logger="qwenvl.checkpoints.loader"):
        load_model(quant, dtype="float32")
    assert "14 pre-quantised (gptq) layer(s) loaded as float" in caplog.text
    assert "a scale per 32 columns, Int8Linear holds one per output row" in caplog.text


@pytest.mark.parametrize("fmt", ["fp8", "gptq8-grouped"])
def test_quantization_on_top_applies_to_the_float_layers_only(written, fmt):
    # FP8 and grouped GPTQ-8 layers load float; asking int8 on top quantises them (and the head) as any
    # float checkpoint, from the dequantised weights
    quant, twin = written(fmt)
    model, _ = load_model(quant, dtype="float32", quantizer=LoadQuantizer("int8"))
    assert all(type(m) is Int8Linear for m in _decoder_linears(model).values())
    assert type(model.lm_head) is Int8Linear
    ref, _ = load_model(twin, dtype="float32", quantizer=LoadQuantizer("int8"))
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_the_checkpoints_own_int4_layers_are_kept_under_quantization_on_top(written):
    quant, _ = written("awq")
    model, _ = load_model(quant, dtype="float32", quantizer=LoadQuantizer("int8"))
    assert all(type(m) is Int4Linear for m in _decoder_linears(model).values())   # the checkpoint's own
    assert type(model.lm_head) is Int8Linear                                        # float in the file


def _rewrite(folder, tmp_path, edit):
    """A copy of `folder` whose tensors went through edit(dict) first."""
    import shutil
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("fmt,edit,named", [
    ("awq", lambda t: t.pop(f"{LAYER}.qzeros"), rf"missing tensor.*{LAYER}\.qzeros"),
    ("gptq4", lambda t: t.pop(f"{LAYER}.g_idx"), rf"missing tensor.*{LAYER}\.g_idx"),
    ("fp8", lambda t: t.pop(f"{LAYER}.weight_scale_inv"), rf"missing tensor.*{LAYER}\.weight_scale_inv"),
    ("awq", lambda t: t.update({f"{LAYER}.qweight": t[f"{LAYER}.qweight"].float()}),
     rf"{LAYER}\.qweight' has dtype torch.float32; the awq format stores it as torch.int32"),
    ("fp8", lambda t: t.update({f"{LAYER}.weight": t[f"{LAYER}.weight"].float()}),
     rf"{LAYER}\.weight' has dtype torch.float32; the fp8 format stores it as torch.float8_e4m3fn"),
    ("gptq4", lambda t: t.update({f"{LAYER}.scales": t[f"{LAYER}.scales"][:1]}),
     rf"{LAYER}\.scales' has shape \(1, 64\)"),
    ("gptq4", lambda t: t.update({f"{LAYER}.g_idx": t[f"{LAYER}.g_idx"] + 5}), rf"{LAYER}\.g_idx' names groups"),
    ("awq", lambda t: t.update({f"{LAYER}.weight": torch.zeros(64, 64)}), rf"unexpected tensor '{LAYER}\.weight'"),
])
def test_bad_or_missing_tensors_are_a_load_error_naming_them(written, tmp_path, fmt, edit, named):
    folder = _rewrite(written(fmt)[0], tmp_path, edit)
    with pytest.raises(LoadError, match=named):
        load_model(folder, dtype="float32")


def test_mixture_of_experts_checkpoints_are_refused_by_name(tiny_checkpoint, tmp_path):
    import shutil
    folder = tmp_path / "moe"
    shutil.copytree(tiny_checkpoint("qwen3_vl_moe"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = FORMATS["fp8"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="pre-quantised \\(fp8\\) mixture-of-experts"):
        load_model(folder)


def test_a_group_size_the_kernel_lacks_is_split_exactly():
    # AWQ with 512-column groups: the int4 kernel takes at most 256, so each group becomes two with the same
    # scale and zero point; the layer still equals the checkpoint's weights
    g = torch.Generator().manual_seed(0)
    in_f, out_f, group = 1024, 64, 512
    q = torch.randint(0, 16, (in_f, out_f), generator=g)
    z = torch.randint(0, 16, (in_f // group, out_f), generator=g)
    s = (torch.rand(in_f // group, out_f, generator=g) * 0.01 + 0.001).half()
    toy = nn.Sequential(nn.Linear(in_f, out_f, bias=False, device="meta"))
    hook = PrequantizedWeights(QuantSpec("awq", 4, group), torch.float32)
    expected = hook.prepare(toy, toy.state_dict())
    assert {k: tuple(v.shape) for k, v in expected.items()} == \
        {"0.qweight": (in_f, out_f // 8), "0.qzeros": (2, out_f // 8), "0.scales": (2, out_f)}
    assert hook.convert("0.qweight", pack_awq(q)) == {} and hook.convert("0.qzeros", pack_awq(z)) == {}
    state = hook.convert("0.scales", s)
    hook.install(toy)
    toy.load_state_dict(state, strict=True, assign=True)
    layer = toy[0]
    assert type(layer) is Int4Linear and layer.group_size == 256
    w = ((q - z.repeat_interleave(group, 0)) * s.float().repeat_interleave(group, 0)).t()
    torch.testing.assert_close(layer.dequantize(), w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt", ["awq", "gptq8-channel"])
def test_in_bfloat16_as_close_to_the_float32_twin_as_the_bfloat16_twin_is(written, fmt):
    # bf16 scales and activations round differently in the packed layer and in a float one; neither
    # should be further from the exact (float32) dequantised model than bf16 itself makes it
    quant, twin = written(fmt)
    exact = tiny_logits(load_model(twin, dtype="float32")[0], PROMPT_IDS)
    got = tiny_logits(load_model(quant, dtype="bfloat16")[0], PROMPT_IDS)
    bf16_twin = tiny_logits(load_model(twin, dtype="bfloat16")[0], PROMPT_IDS)
    assert (got - exact).abs().max() <= 2 * (bf16_twin - exact).abs().max()


def _targets(tiny_checkpoint, qc: dict) -> set[str]:
    """The linears a quantization_config marks as packed in the tiny Qwen2-VL (read off the meta model)."""
    from qwenvl.models.registry import config_from_dir
    from qwenvl.models import build_model
    from qwenvl.checkpoints.quant_formats.spec import read_spec
    cfg = config_from_dir(tiny_checkpoint("qwen2_vl"))
    with torch.device("meta"):
        model = build_model(cfg)
    expected = PrequantizedWeights(read_spec({"quantization_config": qc}), torch.float32).prepare(
        model, model.state_dict())
    return {k.rpartition(".")[0] for k in expected if k.endswith((".qweight", ".weight_scale_inv"))}


def test_which_linears_are_packed_follows_each_writers_rule(tiny_checkpoint):
    decoder = {f"model.language_model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    awq = dict(quant_method="awq", bits=4, group_size=32, version="gemm", zero_point=True)
    gptq = dict(quant_method="gptq", bits=4, group_size=32)
    fp8 = dict(quant_method="fp8", weight_block_size=[32, 32])
    everything = _targets(tiny_checkpoint, awq)             # no skip list: AWQ packs the vision tower too
    assert decoder < everything and "lm_head" not in everything
    assert any(n.startswith("model.visual.blocks.") for n in everything)
    assert _targets(tiny_checkpoint, {**awq, "modules_to_not_convert": ["visual"]}) == decoder   # Hub naming
    assert _targets(tiny_checkpoint, gptq) == decoder       # the decoder blocks only
    assert _targets(tiny_checkpoint, {**gptq, "block_name_to_quantize": "model.layers",
                                      "modules_in_block_to_quantize": [["self_attn.q_proj"], ["mlp.down_proj"]]}) \
        == {n for n in decoder if n.endswith(("q_proj", "down_proj"))}
    assert _targets(tiny_checkpoint, {**gptq, "modules_to_not_convert": ["model.layers.1"]}) == \
        {n for n in decoder if ".layers.0." in n}
    assert _targets(tiny_checkpoint, fp8) == everything     # no list: all but the head
    assert _targets(tiny_checkpoint, {**fp8, "modules_to_not_convert": ["model.visual"]}) == decoder | {"lm_head"}
