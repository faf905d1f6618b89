"""Packers vs unpackers of the published quantised formats (issue 23 item 2). Real AWQ/GPTQ/FP8
checkpoints cannot be downloaded here (no hub), so the layouts are built from the formats' specs."""
import pytest
import torch

from qwenvl.checkpoints.quant_formats import UnsupportedQuantFormat, quant_method
from qwenvl.checkpoints.quant_formats.awq import dequantize_awq, pack_awq, unpack_awq
from qwenvl.checkpoints.quant_formats.fp8 import dequantize_fp8, quantize_fp8
from qwenvl.checkpoints.quant_formats.gptq import dequantize_gptq, pack_gptq, unpack_gptq
from quant_helpers import activation_rounding_bound


def test_awq_round_trip_and_known_nibble_order():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (16, 32), generator=g)
    assert torch.equal(unpack_awq(pack_awq(q)).long(), q)
    # one word by hand: columns 0..7 hold 0..7; nibble j holds column [0,2,4,6,1,3,5,7][j]
    word = pack_awq(torch.arange(8).reshape(1, 8))[0, 0].item() & 0xFFFFFFFF
    assert [(word >> (4 * j)) & 0xF for j in range(8)] == [0, 2, 4, 6, 1, 3, 5, 7]


def test_awq_dequantize_matches_formula():
    g = torch.Generator().manual_seed(1)
    inp, out, gs = 256, 16, 128
    q = torch.randint(0, 16, (inp, out), generator=g)
    z = torch.randint(0, 16, (inp // gs, out), generator=g)
    s = torch.rand(inp // gs, out, generator=g).half()
    w = dequantize_awq(pack_awq(q), pack_awq(z), s, gs)
    ref = ((q - z.repeat_interleave(gs, 0)) * s.float().repeat_interleave(gs, 0)).t()
    assert w.shape == (out, inp) and torch.equal(w, ref.float())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_round_trip_and_dequantize(bits, fmt, desc_act):
    g = torch.Generator().manual_seed(bits)
    inp, out, gs = 64, 32, 16
    q = torch.randint(0, 2 ** bits, (inp, out), generator=g)
    z = torch.randint(0, 2 ** bits, (inp // gs, out), generator=g)
    s = torch.rand(inp // gs, out, generator=g).half()
    g_idx = torch.arange(inp) // gs
    if desc_act:  # act-order: columns' groups follow a random permutation
        g_idx = g_idx[torch.randperm(inp, generator=g)]
    qweight, qzeros = pack_gptq(q, z, bits, fmt)
    assert qweight.shape == (inp * bits // 32, out) and qzeros.shape == (inp // gs, out * bits // 32)
    q2, z2 = unpack_gptq(qweight, qzeros, bits, fmt)
    assert torch.equal(q2.long(), q) and torch.equal(z2, z)
    w = dequantize_gptq(qweight, qzeros, s, g_idx.int(), bits, fmt)
    ref = ((q - z[g_idx]) * s.float()[g_idx]).t()
    assert torch.equal(w, ref.float())


def test_gptq_v1_stores_zero_minus_one():
    q = torch.zeros(8, 8, dtype=torch.long)
    z = torch.full((1, 8), 8)
    _, qzeros = pack_gptq(q, z, 4, "gptq")
    assert (qzeros[0, 0].item() & 0xF) == 7          # stored zero = real zero - 1
    _, qzeros2 = pack_gptq(q, z, 4, "gptq_v2")
    assert (qzeros2[0, 0].item() & 0xF) == 8


def test_gptq_words_by_hand_qweight_along_input_qzeros_along_output():
    # AutoGPTQ's pack(): qweight[row] |= intweight[j] << bits*(j - i) over input rows i..i+per (intweight is
    # [in, out]); qzeros[:, col] |= zeros[:, j] << bits*(j - i) over output columns; v1 stores zero - 1
    q = torch.arange(8).reshape(8, 1).expand(8, 8)                 # input row r holds r, every output
    z = (torch.arange(8) + 1).reshape(1, 8)                        # output column c has zero point c + 1
    qweight, qzeros = pack_gptq(q, z, 4, "gptq")
    assert qweight.shape == (1, 8) and qzeros.shape == (1, 1)
    word = qweight[0, 3].item() & 0xFFFFFFFF
    assert [(word >> (4 * j)) & 0xF for j in range(8)] == list(range(8))
    zword = qzeros[0, 0].item() & 0xFFFFFFFF
    assert [(zword >> (4 * j)) & 0xF for j in range(8)] == list(range(8))
    q8 = torch.tensor([[1], [2], [3], [250]]).expand(4, 4)         # 8 bit: four inputs a word
    assert (pack_gptq(q8, torch.full((1, 4), 128), 8)[0][0, 2].item() & 0xFFFFFFFF) == 1 | 2 << 8 | 3 << 16 | 250 << 24


def test_fp8_block_round_trip_within_e4m3_precision():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(200, 300, generator=g)           # not multiples of 128: partial edge blocks
    q, scale_inv = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and scale_inv.shape == (2, 3)
    back = dequantize_fp8(q, scale_inv)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values; subnormals (below 2^-6 in
    # the scaled domain) have an absolute step of 2^-9, so half of it bounds their error
    assert ((back - w).abs() <= w.abs() * 2 ** -4 + 2 ** -10 * scale_inv.max()).all()


def test_quant_method_read_from_config_and_unsupported_named():
    assert quant_method({}) is None
    assert quant_method({"quantization_config": {"quant_method": "AWQ"}}) == "awq"
    assert quant_method({"text_config": {"quantization_config": {"quant_method": "fp8"}}}) == "fp8"
    with pytest.raises(UnsupportedQuantFormat, match="bitsandbytes.*awq, gptq, fp8"):
        quant_method({"quantization_config": {"quant_method": "bitsandbytes"}})


@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_int4_repacks_into_int4linear(desc_act):
    from qwenvl.layers.quantized_linear import Int4Linear
    from qwenvl.checkpoints.quant_formats.gptq import to_int4_linear_args
    g = torch.Generator().manual_seed(5)
    inp, out, gs = 128, 64, 32
    q = torch.randint(0, 16, (inp, out), generator=g)
    z = torch.randint(0, 16, (inp // gs, out), generator=g)
    s = (torch.rand(inp // gs, out, generator=g) * 0.1).to(torch.bfloat16)
    g_idx = torch.arange(inp) // gs
    if desc_act:
        g_idx = g_idx[torch.randperm(inp, generator=g)]
    qweight, qzeros = pack_gptq(q, z, 4)
    layer = Int4Linear.from_int4(**to_int4_linear_args(qweight, qzeros, s, g_idx.int(), gs), bias=None)
    ref = dequantize_gptq(qweight, qzeros, s, g_idx.int(), 4)
    torch.testing.assert_close(layer.dequantize().float(), ref, rtol=1e-2, atol=1e-2)  # bf16 storage
    x = torch.randn(3, inp, generator=g).to(torch.bfloat16)
    # qwenvl's int4 kernel also rounds x to int8 per group (in the layer's column order): that bound on top
    cols = layer.in_perm if layer.in_perm is not None else torch.arange(inp)
    bound = activation_rounding_bound(x[:, cols], ref[:, cols], gs) if layer.layout == "tiles" else 0
    want = x.float() @ ref.t()
    assert ((layer(x).float() - want).abs() <= bound + 3e-2 + 3e-2 * want.abs()).all()


def test_awq_repacks_into_int4linear():
    from qwenvl.layers.quantized_linear import Int4Linear
    from qwenvl.checkpoints.quant_formats.awq import to_int4_linear_args
    g = torch.Generator().manual_seed(6)
    inp, out, gs = 256, 64, 128
    q = torch.randint(0, 16, (inp, out), generator=g)
    z = torch.randint(0, 16, (inp // gs, out), generator=g)
    s = (torch.rand(inp // gs, out, generator=g) * 0.1).to(torch.bfloat16)
    layer = Int4Linear.from_int4(**to_int4_linear_args(pack_awq(q), pack_awq(z), s, gs), bias=None)
    ref = dequantize_awq(pack_awq(q), pack_awq(z), s, gs)
    torch.testing.assert_close(layer.dequantize().float(), ref, rtol=1e-2, atol=1e-2)


def test_read_spec_takes_every_writers_spelling():
    from qwenvl.checkpoints.quant_formats.spec import read_spec
    assert read_spec({}) is None
    # AutoAWQ's own quant_config spelling
    s = read_spec({"quantization_config": {"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "version": "GEMM"}})
    assert (s.method, s.bits, s.group_size) == ("awq", 4, 64)
    # Qwen2-VL GPTQ: group_size -1 is one group per row; `format` is GPTQModel's newer name for checkpoint_format
    s = read_spec({"quantization_config": {"quant_method": "gptq", "bits": 8, "group_size": -1, "desc_act": True,
                                           "sym": True, "format": "gptq_v2"}})
    assert (s.bits, s.group_size, s.desc_act, s.checkpoint_format) == (8, None, True, "gptq_v2")
    # vLLM / SGLang FP8 configs say ignored_layers; nested text_config placement is read too
    s = read_spec({"text_config": {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128],
                                                           "ignored_layers": ["lm_head"]}}})
    assert (s.block, s.skip) == ((128, 128), ("lm_head",))
    for bad, named in ((dict(quant_method="awq", zero_point=False), "zero_point=false"),
                       (dict(quant_method="gptq", bits=4, checkpoint_format="marlin"), "'marlin'"),
                       (dict(quant_method="fp8", weight_block_size=[128, 128], activation_scheme="static"),
                        "'static'"),
                       (dict(quant_method="compressed-tensors"), "'compressed-tensors'")):
        with pytest.raises(UnsupportedQuantFormat, match=named):
            read_spec({"quantization_config": bad})
