"""qwenvl's int8 and bf16 CPU decode kernels (qwenvl/kernels) against the plain-PyTorch reference of the same
arithmetic (qwenvl/kernels/reference.py): the int8 integer sums exact and the float results within the bound
the reference derives, odd shapes, 1-16 rows, both ISA builds, 1 and 2 threads, each row independent of its
batch; the int8 tile layout; the layers that use them (Int8Linear's tiles, the bf16 class swap) and the
fallback when the compiled module is hidden; a bf16 model decoding token by token against its dequantised
twin. The kernels compile on first use (tests/test_kernels_int4.py's first test times it)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qwenvl import LLM, SamplingParams, kernels
from qwenvl.kernels import build, int8_layout, reference
from qwenvl.layers.attention import ContiguousKVCache
from qwenvl.layers.bf16_linear import BF16_KERNEL_MAX_ROWS, Bf16DecodeLinear, use_bf16_decode_kernel
from qwenvl.layers.quantized_linear import Int8Linear, quantize_int8
from qwenvl.checkpoints.loader import load_model
from qwenvl.checkpoints.quantize import LoadQuantizer
from quant_helpers import activation_rounding_bound
from kernel_fixtures import ISAS, at_thread_counts, compiled, isa  # noqa: F401  (fixtures: every test runs the compiled kernels)

SHAPES = [(1, 32), (15, 33), (17, 100), (100, 256), (48, 544)]      # N not a multiple of 16, K not of 32


@pytest.fixture(params=ISAS)
def bf16_isa(request, compiled):
    needs = "avx512bf16" if request.param == "avx512" else "avx2"
    if not compiled.cpu_supports(needs):
        pytest.skip(f"this CPU lacks {needs}")
    return request.param


def _x(rows, k, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    x[:, min(5, k - 1)] *= 40                  # an outlier channel: its block's step is 40x the others'
    if k >= 64:
        x[0, 32:64] = 0                        # an all-zero block: d = 0, no division by zero
    return x.to(dtype)


def _int8_weights(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scales = torch.rand(n, generator=g) * 0.01 + 1e-3
    bias = torch.randn(n, generator=g)
    return q, scales, bias


# --------------------------------------------------------------------------------------- int8 layout
def test_int8_pack_round_trip_and_byte_order():
    q, _, _ = _int8_weights(37, 70)
    tiles = int8_layout.pack(q)
    assert tiles.shape == (3, 24, 16, 4) and tiles.dtype == torch.int8      # N 37 -> 48, K 70 -> 96
    assert torch.equal(int8_layout.unpack(tiles, 37, 70), q)
    assert (tiles.permute(0, 2, 1, 3).reshape(48, 96)[37:] == 0).all()
    out = torch.empty(21, 70, dtype=torch.bfloat16)
    assert torch.equal(int8_layout.rows_into(tiles, 16, 37, 70, out), q[16:37].to(torch.bfloat16))
    one = torch.zeros(32, 64, dtype=torch.int8)
    one[19, 45] = 7                            # tile 1, row 3 of it, inputs 44..47: byte 1
    flat = int8_layout.pack(one).reshape(-1)
    (index,) = flat.nonzero()[:, 0].tolist()
    assert index == 1 * 16 * 64 + (45 // 4) * 64 + 3 * 4 + 1 and flat[index] == 7


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("r0,r1", [(0, None), (3, 15), (16, None), (5, 6)])
def test_int8_rows_to_bf16_equals_the_plain_cast(n, k, r0, r1):
    """Prefill's scratch from the tiles (C++), any row range, equals the integers cast to bfloat16 (exact)."""
    q, _, _ = _int8_weights(n, k)
    r1 = n if r1 is None else min(r1, n)
    r0 = min(r0, r1)
    out = torch.full((r1 - r0, k), 99.0, dtype=torch.bfloat16)
    kernels.int8_rows_to_bf16(int8_layout.pack(q), r0, r1, out)
    assert torch.equal(out, q[r0:r1].to(torch.bfloat16))


def test_int8_rows_to_bf16_refuses_rows_past_the_tiles():
    tiles = int8_layout.pack(torch.ones(20, 64, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="do not fit"):
        kernels.int8_rows_to_bf16(tiles, 0, 40, torch.empty(40, 64, dtype=torch.bfloat16))


# ---------------------------------------------------------------------------------------- int8 product
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_int8_product_within_the_derived_bound(isa, n, k, rows):
    q, s, b = _int8_weights(n, k)
    tiles, sp = int8_layout.pack(q), int8_layout.pack_scales(s)
    for dtype in (torch.float32, torch.bfloat16):
        for bias in (None, b):
            x = _x(rows, k, dtype)
            y = kernels.int8_matmul(x, tiles, sp, bias, n, isa_name=isa)
            assert y.shape == (rows, n) and y.dtype == dtype
            want, bound = reference.int8_matmul(x, tiles, sp, bias, n, kernels.ACTIVATION_PASSES[dtype])
            slack = want.abs() * 2.0 ** -8 if dtype == torch.bfloat16 else 0       # bf16's own rounding
            assert ((y.double() - want).abs() <= bound + slack).all()


def test_int8_integer_sums_are_exact(isa):
    """Integer activations whose block maximum is 127 quantise to themselves (d = 1); with scale 1 the
    output is the integer dot product itself, exact in float32 below 2^24."""
    n, k = 40, 512
    q, _, _ = _int8_weights(n, k)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-127, 128, (3, k), generator=g).float()
    x.view(3, -1, 32)[..., 0] = 127
    y = kernels.int8_matmul(x, int8_layout.pack(q), int8_layout.pack_scales(torch.ones(n)), None, n, isa_name=isa)
    assert torch.equal(y.double(), x.double() @ q.double().T)
    big = torch.full((1, k), 127.0)                       # the largest sums: 512 * 127 * 127 = 8.3e6 < 2^24
    qmax = torch.full((n, k), -127, dtype=torch.int8)
    y = kernels.int8_matmul(big, int8_layout.pack(qmax), int8_layout.pack_scales(torch.ones(n)), None, n,
                            isa_name=isa)
    assert (y == -k * 127 * 127).all()


@pytest.mark.parametrize("rows", range(1, 17))
def test_int8_every_row_count_and_each_row_equals_itself_alone(isa, rows):
    q, s, b = _int8_weights(40, 256)
    tiles, sp = int8_layout.pack(q), int8_layout.pack_scales(s)
    for dtype in (torch.bfloat16, torch.float32):
        x = _x(rows, 256, dtype, seed=rows)
        y = kernels.int8_matmul(x, tiles, sp, b, 40, isa_name=isa)
        want, bound = reference.int8_matmul(x, tiles, sp, b, 40, kernels.ACTIVATION_PASSES[dtype])
        slack = want.abs() * 2.0 ** -8 if dtype == torch.bfloat16 else 0
        assert ((y.double() - want).abs() <= bound + slack).all()
        for r in range(rows):
            assert torch.equal(kernels.int8_matmul(x[r:r + 1], tiles, sp, b, 40, isa_name=isa), y[r:r + 1])


@pytest.mark.parametrize("rows", [17, 32, 33])
def test_an_int8_layer_runs_a_decode_batch_over_16_rows_in_kernel_calls_each_row_as_alone(monkeypatch, rows):
    """Up to INT8_KERNEL_CHUNKED_ROWS rows run in 16-row kernel calls (each row the bytes it gets alone); more
    rows take the prefill GEMM."""
    from qwenvl.layers import quantized_linear
    layer = Int8Linear.from_float(nn.Linear(256, 40, bias=True).to(torch.bfloat16))
    layer.use_tile_layout()
    x = _x(rows, 256, torch.bfloat16, seed=rows)
    calls = []
    real = kernels.int8_matmul
    monkeypatch.setattr(kernels, "int8_matmul", lambda x2, *a, **kw: calls.append(x2.shape[0]) or real(x2, *a, **kw))
    y = layer(x)
    if rows <= quantized_linear.INT8_KERNEL_CHUNKED_ROWS:
        assert calls == [16] * (rows // 16) + ([rows % 16] if rows % 16 else [])
        assert all(torch.equal(layer(x[r:r + 1]), y[r:r + 1]) for r in range(rows))
    else:
        assert calls == []
        torch.testing.assert_close(y, F.linear(x, layer.dequantize(), layer.bias.to(x.dtype)), rtol=2e-2, atol=2e-2)


def test_int8_both_builds_give_the_same_bytes(compiled):
    if not compiled.cpu_supports("avx512"):
        pytest.skip("this CPU lacks avx512")
    q, s, b = _int8_weights(70, 416)
    tiles, sp = int8_layout.pack(q), int8_layout.pack_scales(s)
    for dtype in (torch.bfloat16, torch.float32):
        x = _x(11, 416, dtype)
        assert torch.equal(kernels.int8_matmul(x, tiles, sp, b, 70, isa_name="avx512"),
                           kernels.int8_matmul(x, tiles, sp, b, 70, isa_name="avx2"))


def test_int8_one_and_two_threads_give_the_same_bytes(isa):
    q, s, b = _int8_weights(1000, 1024)                 # 63 tiles of 16 KB: split over the threads
    tiles, sp = int8_layout.pack(q), int8_layout.pack_scales(s)
    x = _x(8, 1024, torch.bfloat16)
    results = at_thread_counts(lambda: kernels.int8_matmul(x, tiles, sp, b, 1000, isa_name=isa))
    assert torch.equal(results[0], results[1])


def test_int8_bad_arguments_are_clear_errors():
    q, s, _ = _int8_weights(16, 64)
    tiles, sp = int8_layout.pack(q), int8_layout.pack_scales(s)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="tiles must be contiguous int8"):
        kernels.int8_matmul(x, tiles[:, :8].contiguous(), sp, None, 16)
    with pytest.raises(RuntimeError, match="scales must be contiguous float32"):
        kernels.int8_matmul(x, tiles, sp.double(), None, 16)
    with pytest.raises(RuntimeError, match="bias must be contiguous float32"):
        kernels.int8_matmul(x, tiles, sp, torch.zeros(15), 16)
    with pytest.raises(RuntimeError, match="1 to 16"):
        kernels.int8_matmul(torch.randn(17, 64), tiles, sp, None, 16)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.int8_matmul(x.half(), tiles, sp, None, 16)


# ---------------------------------------------------------------------------------------- bf16 product
@pytest.mark.parametrize("n,k", SHAPES + [(7, 8), (33, 1000)])
@pytest.mark.parametrize("rows", [1, 3, 9, 16])
def test_bf16_product_within_the_derived_bound(bf16_isa, n, k, rows):
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g).bfloat16()
    for bias in (None, torch.randn(n, generator=g).bfloat16()):
        x = _x(rows, k, torch.bfloat16)
        y = kernels.bf16_matmul(x, w, bias, isa_name=bf16_isa)
        assert y.shape == (rows, n) and y.dtype == torch.bfloat16
        want, bound = reference.bf16_matmul(x, w, bias)
        assert ((y.double() - want).abs() <= bound + want.abs() * 2.0 ** -8).all()
        for r in range(rows):           # a row alone gives the same bytes as in its batch
            assert torch.equal(kernels.bf16_matmul(x[r:r + 1], w, bias, isa_name=bf16_isa), y[r:r + 1])


def test_bf16_reads_a_strided_weight_and_two_threads_agree(bf16_isa):
    g = torch.Generator().manual_seed(0)
    big = torch.randn(600, 1100, generator=g).bfloat16()
    w = big[:, 50:1074]                                    # rows 1100 apart: nn.Linear's weight may be a view
    x = _x(4, 1024, torch.bfloat16)
    results = at_thread_counts(lambda: kernels.bf16_matmul(x, w, None, isa_name=bf16_isa))
    assert torch.equal(results[0], results[1])
    want, bound = reference.bf16_matmul(x, w, None)
    assert ((results[0].double() - want).abs() <= bound + want.abs() * 2.0 ** -8).all()


def test_bf16_bad_arguments_are_clear_errors():
    w = torch.randn(16, 64).bfloat16()
    with pytest.raises(RuntimeError, match="x must be a 2-D bfloat16"):
        kernels.bf16_matmul(torch.randn(2, 64), w, None)
    with pytest.raises(RuntimeError, match=r"weight must be a bfloat16 \[N, 64\]"):
        kernels.bf16_matmul(torch.randn(2, 64).bfloat16(), w[:, :32], None)
    with pytest.raises(RuntimeError, match="1 to 16"):
        kernels.bf16_matmul(torch.randn(17, 64).bfloat16(), w, None)


# -------------------------------------------------------------------------------------------- layers
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_tile_layer_equals_the_plain_layers_dequantised_product(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(300, 70, bias=True).to(dtype)
    plain = Int8Linear.from_float(lin)
    tiled = Int8Linear.from_float(lin)
    tiled.use_tile_layout()
    assert tiled.layout == "tiles" and tiled.qweight is None and "qweight" not in tiled.state_dict()
    assert torch.equal(tiled.dequantize(), plain.dequantize()) and "tiles layout" in repr(tiled)
    for rows in (1, 7, 16):
        x = _x(rows, 300, dtype)
        ref = F.linear(x.double(), plain.dequantize().double(), plain.bias.double())
        got = tiled(x)
        assert got.dtype == dtype and torch.equal(tiled(x.view(1, rows, 300))[0], got)
        if dtype == torch.float32:      # three activation passes: finer than float32's rounding of the product
            assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
        else:                           # one int8 pass per block of 32 (half a step an input), bf16's rounding
            w = F.pad(plain.dequantize().float(), (0, 20))
            bound = activation_rounding_bound(F.pad(x.float(), (0, 20)), w, 32)
            assert ((got.double() - ref).abs() <= bound * 1.01 + ref.abs() * 2.0 ** -8 + 1e-6).all()
    x = _x(40, 300, dtype)                                 # prefill: the GEMM over the same integers
    torch.testing.assert_close(tiled(x), plain(x), rtol=0, atol=0)


def test_bf16_decode_linear_uses_the_kernel_for_few_rows_only(monkeypatch):
    torch.manual_seed(0)
    lin = nn.Linear(200, 50).bfloat16()
    ref = nn.Linear(200, 50).bfloat16()
    ref.load_state_dict(lin.state_dict())
    lin.__class__ = Bf16DecodeLinear
    calls = []
    real = kernels.bf16_matmul
    monkeypatch.setattr(kernels, "bf16_matmul", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    with torch.no_grad():
        for rows in (1, BF16_KERNEL_MAX_ROWS, BF16_KERNEL_MAX_ROWS + 1, 40):
            x = _x(rows, 200, torch.bfloat16)
            torch.testing.assert_close(lin(x), ref(x), rtol=1.6e-2, atol=1e-2)
        assert calls == [1, BF16_KERNEL_MAX_ROWS]
        lin(_x(2, 200, torch.float32).bfloat16().float().to(torch.bfloat16).float().bfloat16())
    x = _x(1, 200, torch.bfloat16).requires_grad_()
    lin(x).sum().backward()                                # autograd: F.linear, not the kernel
    assert x.grad is not None and calls == [1, BF16_KERNEL_MAX_ROWS, 2]


def _decode_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """logits [N, V] of a prompt fed one token at a time: every product a one-row decode product."""
    cache = ContiguousKVCache(model.cfg.text.num_hidden_layers)
    out = []
    with torch.inference_mode():
        for i in range(ids.shape[0]):
            hidden = model(ids[i:i + 1], torch.full((3, 1), i), cache, None, [])
            out.append(model.compute_logits(hidden))
    return torch.cat(out)


def _dequantised_twin(model) -> None:
    """Every Int8Linear replaced by nn.Linear over its dequantised weight: the same weights, exact activations."""
    for name, m in list(model.named_modules()):
        if isinstance(m, Int8Linear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            lin.weight = nn.Parameter(m.dequantize(), requires_grad=False)
            if m.bias is not None:
                lin.bias = nn.Parameter(m.bias.clone(), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, lin)


def test_bf16_int8_model_decodes_close_to_its_dequantised_twin(tiny_checkpoint, monkeypatch):
    """Issue 23's tolerance for int8 logits is 4% of their norm against the float model; the kernel's
    activation rounding (Q8_0's: per block of 32) must stay well inside it against the same int8 weights
    with exact activations. Measured on this model: ~1% (bf16 arithmetic alone: ~0.5%)."""
    ckpt = tiny_checkpoint("qwen2_5_vl")
    model, _ = load_model(ckpt, dtype="bfloat16", quantizer=LoadQuantizer("int8"), fuse=True)
    layers = [m for n, m in model.named_modules() if isinstance(m, Int8Linear) and not n.startswith("model.visual")]
    assert layers and all(m.layout == "tiles" for m in layers)
    ids = torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(0))
    got = _decode_logits(model, ids).float()
    _dequantised_twin(model)
    want = _decode_logits(model, ids).float()
    err = ((got - want).norm(dim=1) / want.norm(dim=1)).max().item()
    assert err < 0.03, err


def test_bf16_model_gets_the_kernel_and_decodes_like_f_linear(tiny_checkpoint, monkeypatch):
    ckpt = tiny_checkpoint("qwen2_vl")
    model, _ = load_model(ckpt, dtype="bfloat16", fuse=True)
    swapped = [n for n, m in model.named_modules() if type(m) is Bf16DecodeLinear]
    assert swapped and all(n.startswith(("model.language_model.", "lm_head", "output_head")) for n in swapped)
    assert not any(type(m) is nn.Linear for n, m in model.named_modules() if n.startswith("model.language_model."))
    if model.tied_output_weight() is not None:          # the tied head reads the embedding itself, no copy
        assert model.output_head.weight.data_ptr() == model.tied_output_weight().data_ptr()
    ids = torch.randint(0, 300, (10,), generator=torch.Generator().manual_seed(1))
    calls = []
    real = kernels.bf16_matmul
    monkeypatch.setattr(kernels, "bf16_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = _decode_logits(model, ids).float()
    assert len(calls) >= 10 * len(swapped)              # every swapped layer, every step
    monkeypatch.setenv(kernels.MODE_ENV, "off")         # the same model, every product through F.linear
    want = _decode_logits(model, ids).float()
    err = ((got - want).norm(dim=1) / want.norm(dim=1)).max().item()
    assert err < 0.02, err          # float32 sums in another order, rounded to bf16: mostly the same bytes


def test_engine_batched_bf16_int8_rows_equal_each_alone(tiny_checkpoint):
    """Decode steps of several sequences through the int8 and bf16 kernels: each request's tokens are the
    ones it gets alone (every row is quantised on its own)."""
    ckpt = tiny_checkpoint("qwen2_vl")
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    convs = [[{"role": "user", "content": f"count to {i} please"}] for i in range(4)]
    for quantization in ("int8", None):
        batched = LLM(ckpt, dtype="bfloat16", quantization=quantization).generate(convs, greedy)
        for conv, out in zip(convs, batched):
            alone = LLM(ckpt, dtype="bfloat16", quantization=quantization, enable_prefix_caching=False).chat(conv, greedy)
            assert out.token_ids == alone.token_ids


def test_hidden_module_warns_and_the_layers_answer_without_it(monkeypatch, tiny_checkpoint):
    torch.manual_seed(0)
    lin = nn.Linear(256, 64).bfloat16()
    with_kernels = Int8Linear.from_float(lin)
    with_kernels.use_tile_layout()
    x = _x(3, 256, torch.bfloat16)
    y_kernel = with_kernels(x)
    monkeypatch.setattr(build, "_loaded", (None, "hidden by the test"))
    monkeypatch.setattr(kernels, "_warned", set())
    kernels._forget()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y_fallback = with_kernels(x)                 # tiles, no kernel: the GEMM over the same integers
            model, _ = load_model(tiny_checkpoint("qwen2_vl"), dtype="bfloat16",
                                  quantizer=LoadQuantizer("int8"), fuse=True)
        assert [str(c.message) for c in caught] == [
            "qwen2vl: CPU kernels unavailable (hidden by the test); using PyTorch's kernels instead".replace(
                "qwen2vl", "qwenvl")]
        ref = F.linear(x.double(), with_kernels.dequantize().double(), with_kernels.bias.double())
        assert (y_fallback.double() - ref).abs().max() <= 1e-2 * ref.abs().max()
        bound = activation_rounding_bound(x.float(), with_kernels.dequantize().float(), 32)
        assert ((y_kernel.double() - ref).abs() <= bound * 1.01 + ref.abs() * 2.0 ** -8 + 1e-6).all()
        layers = [m for n, m in model.named_modules() if isinstance(m, Int8Linear) and not n.startswith("model.visual")]
        assert layers and all(m.layout != "tiles" for m in layers)
        assert not any(type(m) is Bf16DecodeLinear for m in model.modules())
        assert use_bf16_decode_kernel(nn.Sequential(nn.Linear(4, 4).bfloat16())) == 0
    finally:
        kernels._forget()


def test_quantize_int8_rows_keep_their_scales_through_the_tiles():
    w = torch.randn(33, 70) * 0.05
    q, s = quantize_int8(w, torch.float32)
    layer = Int8Linear.from_int8(q, s, None)
    layer.use_tile_layout()
    assert torch.equal(layer.dequantize(), q.float() * s[:, None])


def test_a_stale_build_lock_left_by_a_killed_build_does_not_hang_the_next_process(tmp_path):
    """torch's build `lock` file outlives a builder killed mid-build; the next process removes it (no live
    builder holds build.flock) and loads, instead of waiting on it forever."""
    import shutil
    import subprocess
    import sys

    built = build.cache_dir()
    copy = tmp_path / built.name
    shutil.copytree(built, copy)
    (copy / "lock").write_text("")                     # as a killed build leaves it
    code = "from qwenvl.kernels import build; m, cause = build.load(); assert m is not None, cause; print('loaded')"
    env = {**__import__("os").environ, build.CACHE_ENV: str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "loaded" in out.stdout, out.stderr[-2000:]
    assert not (copy / "lock").exists()
