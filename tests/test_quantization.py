"""Weight-only int8 / int4: the layers against their dequantised weights, the kernel layout, the module
swap on tiny checkpoints against the float model, the API and CLI surface."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from qwenvl import LLM, SamplingParams
from qwenvl.layers.quantized_linear import (LAYOUT_INT4PACK, LAYOUT_TILES, Int4Linear, Int8Linear,
                                            _unpack_cpu_int4, int4_group_size, quantize_int4, quantize_int8)
from qwenvl.checkpoints.loader import load_model
from qwenvl.checkpoints.quantize import quantize_model
from quant_helpers import activation_rounding_bound, streamed_equals_swapped, tiny_logits

ROWS = (1, 3, 8, 9, 16, 40)      # both sides of DECODE_MAX_ROWS and INT4_KERNEL_MAX_ROWS: kernels and GEMM
LAYOUTS = (LAYOUT_TILES, LAYOUT_INT4PACK)


def _weight(out_f=96, in_f=256, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g) * 0.05


def test_int8_round_trip_is_within_half_a_step():
    w = _weight()
    q, s = quantize_int8(w, torch.float32)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (q.float() * s[:, None] - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()


def test_int4_round_trip_is_within_half_a_step():
    w = _weight()
    q, s, z = quantize_int4(w, 64, torch.float32)
    assert q.dtype == torch.uint8 and q.max() <= 15 and s.shape == z.shape == (96, 4)
    deq = (q.float().view(96, 4, 64) - z[..., None]) * s[..., None]
    assert ((deq.view(96, 256) - w).abs() <= s.repeat_interleave(64, dim=1) / 2 + 1e-6).all()


def test_unpack_inverts_the_cpu_int4_pack():
    q = torch.randint(0, 16, (128, 256), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert torch.equal(_unpack_cpu_int4(packed, 128, 256), q.to(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", ROWS)
def test_int8_layer_equals_linear_with_its_dequantised_weight(dtype, rows):
    lin = torch.nn.Linear(256, 96, bias=True).to(dtype)
    layer = Int8Linear.from_float(lin)
    x = torch.randn(rows, 256, dtype=dtype)
    ref = F.linear(x.float(), layer.dequantize().float(), lin.bias.float())
    tol = 1e-4 if dtype == torch.float32 else 3e-2 * ref.abs().max().item()
    torch.testing.assert_close(layer(x).float(), ref, atol=tol, rtol=0)
    batched = layer(x.view(1, rows, 256))            # 3-D: not the 2-D decode shortcut, the same numbers
    assert batched.shape == (1, rows, 96) and torch.equal(batched[0], layer(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_int4_layer_equals_linear_with_its_dequantised_weight(dtype, rows, layout):
    """Against the dequantised weight in float32; qwenvl's kernel (tiles, <= 16 rows) also rounds the
    activations to int8 per group, which `activation_rounding_bound` bounds."""
    lin = torch.nn.Linear(256, 100, bias=True).to(dtype)     # 100 rows: the packs pad to 112 / 128
    layer = Int4Linear.from_float(lin, group_size=64, layout=layout)
    assert layer.layout == layout
    x = torch.randn(rows, 256, dtype=dtype)
    w = layer.dequantize().float()
    ref = F.linear(x.float(), w, lin.bias.float())
    tol = 1e-4 if dtype == torch.float32 else 3e-2 * ref.abs().max().item()
    bound = activation_rounding_bound(x, w, 64) if layout == LAYOUT_TILES and rows <= 16 else 0
    assert ((layer(x).float() - ref).abs() <= bound + tol).all()


def test_int4_from_published_integers_and_act_order_permutation():
    """from_int4 takes (q, scale, zero) as AWQ/GPTQ store them; with in_perm the columns are stored in
    act order and the layer permutes its input, while dequantize() gives the original column order."""
    out_f, in_f, g = 64, 128, 32
    q = torch.randint(0, 16, (out_f, in_f), dtype=torch.uint8)
    s = torch.rand(out_f, in_f // g) * 0.01 + 1e-3
    z = torch.randint(0, 16, (out_f, in_f // g)).float()
    w_perm = (q.float().view(out_f, -1, g) - z[..., None]) * s[..., None]           # act-order columns
    perm = torch.randperm(in_f)
    w = torch.empty(out_f, in_f)
    w[:, perm] = w_perm.view(out_f, in_f)                                              # original order
    for layout in LAYOUTS:
        layer = Int4Linear.from_int4(q, s, z, g, None, in_perm=perm, layout=layout)
        torch.testing.assert_close(layer.dequantize(), w, atol=1e-6, rtol=0)
        for rows in (1, 20):
            x = torch.randn(rows, in_f)
            bound = activation_rounding_bound(x[:, perm], w[:, perm], g) if layout == LAYOUT_TILES and rows <= 16 else 0
            assert ((layer(x) - x @ w.T).abs() <= bound + 1e-4).all()


def test_int4_group_size_keeps_four_groups_a_row_or_falls_back():
    assert int4_group_size(4096) == 128 and int4_group_size(1536) == 128 and int4_group_size(512) == 128
    assert int4_group_size(4096, 256) == 256
    assert int4_group_size(128) == 32 and int4_group_size(256) == 64
    assert int4_group_size(96) == 32
    assert int4_group_size(64) == 32
    assert int4_group_size(40) is None


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint("qwen2_5_vl")


@pytest.mark.parametrize("mode,tol", [("int8", 0.04), ("int4", 0.30)])
def test_quantised_logits_stay_near_the_float_model(ckpt, mode, tol):
    """Relative logit error ||a - b|| / ||a|| under `tol`. Why these bounds: on Gaussian weights the
    rounding noise per weight is step / sqrt(12) of a weight's spread: ~0.7% for int8 (a row's range of
    ~6 sigma over 254 steps) and ~9% for int4 (a group's ~4.8 sigma over 15 steps); the tiny model's
    layers compound it about 2x (measured: 1.7% int8, 20% int4). The swap must cover every
    language-model linear and the tied head."""
    ref, _ = load_model(ckpt, dtype="float32")
    quant, _ = load_model(ckpt, dtype="float32")
    quantize_model(quant, mode)
    plain = [n for n, m in quant.named_modules()
             if isinstance(m, torch.nn.Linear) and n.startswith(("model.language_model.", "lm_head"))]
    assert plain == []
    ids = torch.randint(0, 300, (24,), generator=torch.Generator().manual_seed(0))
    a, b = tiny_logits(ref, ids), tiny_logits(quant, ids)
    assert (a - b).norm() / a.norm() < tol
    # greedy choices agree wherever the float model has no near tie (top-2 gap above twice the error)
    top2 = a.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * (a - b).abs().max()
    if mode == "int8":
        assert clear.sum() > 0
    assert torch.equal(a.argmax(-1)[clear], b.argmax(-1)[clear])


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8))


@pytest.mark.parametrize("family,mode,vision", [("qwen2_5_vl", "int8", False), ("qwen2_5_vl", "int4", False),
                                                ("qwen2_vl", "int4", True), ("qwen3_vl", "int8", True)])
def test_chat_through_the_engine_when_quantised(tiny_checkpoint, family, mode, vision):
    llm = LLM(tiny_checkpoint(family), dtype="float32", quantization=mode, quantize_vision=vision)
    out = llm.chat([{"role": "user", "content": [{"image": _image(0)}, {"text": "describe"}]}],
                   SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


def test_unknown_quantization_is_a_clear_error(ckpt):
    with pytest.raises(ValueError, match=r"quantization='int3'.*int8, int4"):
        LLM(ckpt, quantization="int3")


def test_cli_quantization_flag(capsys):
    from qwenvl.cli.main import build_parser, main
    args = build_parser().parse_args(["chat", "--quantization", "int4", "--image", "x.png", "q"])
    assert args.quantization == "int4"
    with pytest.raises(SystemExit):
        main(["chat", "--quantization", "fp4", "q"])
    assert "invalid choice: 'fp4'" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantising_while_loading_equals_quantising_the_loaded_model(ckpt, mode):
    """The loader's tensor-by-tensor path (no float copy of the model) builds the same buffers as the
    module swap on a loaded float model, and the strict checks still see the checkpoint's float names."""
    streamed_equals_swapped(ckpt, mode)


def test_quantize_vision_covers_the_vision_tower(ckpt):
    from qwenvl.checkpoints.quantize import LoadQuantizer
    model, _ = load_model(ckpt, dtype="float32", quantizer=LoadQuantizer("int8", include_vision=True))
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())


@pytest.mark.parametrize("qc,named", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, r"quant_method='bitsandbytes'.*quantization='int8' or 'int4'"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, r"awq version='gemv'"),
    ({"quant_method": "gptq", "bits": 3}, r"gptq with bits=3"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, r"fp8 with weight_block_size=None"),
])
def test_an_unreadable_prequantised_checkpoint_is_refused_by_name(ckpt, tmp_path, qc, named):
    # the readable formats load (tests/test_prequantized_load.py); the rest say what they are
    import json
    import shutil
    from qwenvl.checkpoints.loader import LoadError
    folder = tmp_path / "ckpt"
    shutil.copytree(ckpt, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = qc
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match=named):
        load_model(folder)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_the_embedding_table_is_int8_rows_within_half_a_step(ckpt, mode):
    from qwenvl.layers.quantized_embedding import Int8Embedding
    from qwenvl.checkpoints.quantize import LoadQuantizer
    ref, _ = load_model(ckpt, dtype="float32")
    table = ref.model.language_model.embed_tokens.weight.detach()
    streamed, _ = load_model(ckpt, dtype="float32", quantizer=LoadQuantizer(mode))
    emb = streamed.model.language_model.embed_tokens
    assert isinstance(emb, Int8Embedding) and emb.qweight.dtype == torch.int8
    ids = torch.tensor([0, 5, 17, table.shape[0] - 1])
    step = table.abs().amax(dim=1) / 127
    assert ((emb(ids) - table[ids]).abs() <= step[ids, None] / 2 + 1e-7).all()
    swapped = quantize_model(load_model(ckpt, dtype="float32")[0], mode).model.language_model.embed_tokens
    assert torch.equal(swapped(ids), emb(ids))


@pytest.mark.parametrize("layout,padded", [(LAYOUT_TILES, 4208), (LAYOUT_INT4PACK, 4224)])
def test_int4_packed_a_block_of_rows_at_a_time_equals_packing_it_whole(layout, padded):
    w = torch.randn(4096 + 100, 128)                     # two blocks; the last one padded to 16- / 64-row blocks
    bias = torch.randn(4196)
    whole = Int4Linear.from_int4(*quantize_int4(w, 32), 32, bias, layout=layout)
    blocks = Int4Linear.from_weight(w, 32, bias, layout=layout)
    for (name, a), (_, b) in zip(whole.named_buffers(), blocks.named_buffers()):
        assert torch.equal(a, b), name
    assert blocks.out_features == 4196 and blocks.packed.shape[0] == padded


@pytest.mark.parametrize("layout", LAYOUTS)
def test_int4_rows_read_from_the_packed_layout_equal_the_dequantised_matrix(layout):
    w = torch.randn(150, 256, dtype=torch.bfloat16)            # 150 rows: the last row block padded
    perm = torch.randperm(256)
    for layer in (Int4Linear.from_weight(w, 64, None, layout=layout),
                  Int4Linear.from_int4(*quantize_int4(w.float(), 64), 64, None, in_perm=perm, layout=layout)):
        ids = torch.tensor([[0, 31, 32, 63], [64, 100, 149, 7]])
        assert torch.equal(layer.dequantized_rows(ids), layer.dequantize()[ids])


def test_a_tied_int4_model_embeds_with_its_heads_rows(tied_checkpoint):
    """Tied and int4: the embedding has no table of its own, it dequantises the int4 head's rows; the
    loader's path and the module swap agree, and the engine answers."""
    from qwenvl.layers.quantized_embedding import TiedInt4Embedding
    from qwenvl.checkpoints.quantize import LoadQuantizer
    path = tied_checkpoint

    float_model, _ = load_model(path, dtype="float32")
    table = float_model.model.language_model.embed_tokens.weight.detach()
    streamed, _ = load_model(path, dtype="float32", quantizer=LoadQuantizer("int4"))
    emb = streamed.model.language_model.embed_tokens
    assert isinstance(emb, TiedInt4Embedding) and list(emb.buffers()) == []
    assert not any(k.startswith("model.language_model.embed_tokens") for k in streamed.state_dict())
    ids = torch.arange(table.shape[0])
    assert torch.equal(emb(ids), streamed.output_head.dequantize()[ids])
    groups = table.view(table.shape[0], -1, streamed.output_head.group_size)
    half_step = ((groups.amax(-1) - groups.amin(-1)) / 15 / 2).repeat_interleave(groups.shape[-1], dim=1)
    assert ((emb(ids) - table).abs() <= half_step + 1e-6).all()
    swapped = quantize_model(float_model, "int4").model.language_model.embed_tokens
    assert isinstance(swapped, TiedInt4Embedding) and torch.equal(swapped(ids), emb(ids))
    out = LLM(str(path), quantization="int4", dtype="float32").chat(
        [{"role": "user", "content": "count to five"}], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 4
