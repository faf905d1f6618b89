"""qwenvl's int4 CPU kernel (qwenvl/kernels) against the plain-PyTorch reference of the same arithmetic
(qwenvl/kernels/reference.py): the activation quantisation and the integer sums bit-exact, the float
result within the bound the reference derives, both ISA builds, any thread count, every row independent of
its batch; the layout round trip; the switch (QWENVL_KERNELS) and the fallback with its one warning; the
model's int4 layers (dense and MoE experts) running through it.

The first test compiles the kernels into the cache (~1-2 min on 2 cores, once per machine); the suite
must run the compiled kernels, so a failed build fails here rather than silently testing the fallback."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from qwenvl import kernels
from qwenvl.kernels import build, int4_layout, reference
from qwenvl.layers.quantized_linear import LAYOUT_INT4PACK, LAYOUT_TILES, Int4Linear
from kernel_fixtures import ISAS, at_thread_counts, compiled, isa  # noqa: F401  (fixtures: every test runs the compiled kernels)

GROUPS = (32, 64, 128, 256)


def _layer_tensors(n, k, group, param_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scales = (torch.rand(n, k // group, generator=g) * 0.02 + 1e-3).to(param_dtype)
    mins = (-torch.rand(n, k // group, generator=g) * 0.15).to(param_dtype)
    return q, scales, mins


def _x(rows, k, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    x[:, 5] *= 40                           # an outlier channel: its group's step is 40x the others'
    if k >= 64:
        x[0, 32:64] = 0                     # an all-zero group (G = 32): d = 0, no division by zero
    return x.to(dtype)


# ------------------------------------------------------------------------------------------ layout
def test_pack_unpack_round_trip_and_rows():
    q, s, m = _layer_tensors(37, 96, 32)
    packed, params = int4_layout.pack(q, s, m, 32, torch.float32)
    assert packed.shape == (48, 48) and params.shape == (3, 3, 2, 16)
    assert torch.equal(int4_layout.unpack(packed, 96)[:37], q)
    assert (int4_layout.unpack(packed, 96)[37:] == 0).all()
    scales, mins = int4_layout.unpack_params(params)
    assert torch.equal(scales[:37], s) and torch.equal(mins[:37], m) and (scales[37:] == 0).all()
    w = int4_layout.dequantize(packed, params, 96, 32, torch.float32)[:37]
    torch.testing.assert_close(w, (q.float().view(37, 3, 32) * s[..., None] + m[..., None]).view(37, 96))
    ids = torch.tensor([0, 15, 16, 36, 3])
    assert torch.equal(int4_layout.dequantize_rows(packed, params, 96, 32, ids, torch.float32), w[ids])


def test_the_byte_layout_is_the_documented_one():
    """Row n, input k of a tile: block k // 32, chunk (k % 32) // 8, byte 4n + k % 4, high nibble when
    k % 8 >= 4 (csrc/int4_kernel.hpp reads it this way)."""
    q = torch.zeros(16, 64, dtype=torch.uint8)
    q[9, 45] = 7                                   # block 1, chunk 1, input 5 of the chunk: byte 1, high
    packed, _ = int4_layout.pack(q, torch.ones(16, 2), torch.zeros(16, 2), 32, torch.float32)
    flat = packed.reshape(-1)
    (index,) = flat.nonzero()[:, 0].tolist()
    assert index == 1 * 256 + 1 * 64 + 9 * 4 + 1 and flat[index] == 7 << 4


def test_bad_group_sizes_are_refused_by_name():
    q, s, m = _layer_tensors(16, 96, 32)
    with pytest.raises(ValueError, match="group size 48"):
        int4_layout.pack(q, s[:, :2], m[:, :2], 48, torch.float32)


# ------------------------------------------------------------------------ activation quantisation
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("dtype,passes", [(torch.bfloat16, 1), (torch.float32, 1), (torch.float32, 3)])
def test_activation_quantisation_is_bit_exact(isa, group, dtype, passes):
    x = _x(5, 512, dtype)
    got = kernels.quantize_activations(x, group, passes, isa_name=isa)
    want = reference.quantize_activations(x, group, passes)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    a = got[0].view(5, passes, 512)
    assert a.abs().max() <= 127 and (a[0, 0, 32:64] == 0).all()


# ------------------------------------------------------------------------------------- the product
@pytest.mark.parametrize("n,k,group", [(1, 32, 32), (15, 96, 32), (17, 192, 64), (100, 256, 128),
                                       (33, 768, 256), (48, 512, 128)])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_product_within_the_derived_bound(isa, n, k, group, rows):
    q, s, m = _layer_tensors(n, k, group)
    packed, params = int4_layout.pack(q, s, m, group, torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        x = _x(rows, k, dtype)
        y = kernels.int4_matmul(x, packed, params, group, n, isa_name=isa)
        assert y.shape == (rows, n) and y.dtype == dtype
        want, bound = reference.int4_matmul(x, packed, params, group, n, kernels.ACTIVATION_PASSES[dtype])
        # a bfloat16 result is the float32 one rounded to nearest even: half a bfloat16 step more
        slack = want.abs() * 2.0 ** -8 if dtype == torch.bfloat16 else 0
        assert ((y.double() - want).abs() <= bound + slack).all()


@pytest.mark.parametrize("rows", range(1, 17))
def test_every_row_count_and_each_row_equals_itself_alone(isa, rows):
    """1..16 rows (row blocks of 8 / 4 and their remainders); a row's bytes never depend on its batch."""
    q, s, m = _layer_tensors(40, 256, 64, torch.bfloat16)
    packed, params = int4_layout.pack(q, s, m, 64, torch.bfloat16)
    for dtype in (torch.bfloat16, torch.float32):
        x = _x(rows, 256, dtype, seed=rows)
        y = kernels.int4_matmul(x, packed, params, 64, 40, isa_name=isa)
        want, bound = reference.int4_matmul(x, packed, params, 64, 40, kernels.ACTIVATION_PASSES[dtype])
        slack = want.abs() * 2.0 ** -8 if dtype == torch.bfloat16 else 0
        assert ((y.double() - want).abs() <= bound + slack).all()
        for r in range(rows):
            assert torch.equal(kernels.int4_matmul(x[r:r + 1], packed, params, 64, 40, isa_name=isa), y[r:r + 1])


@pytest.mark.parametrize("group", GROUPS)
def test_integer_sums_are_exact(isa, group):
    """Integer activations whose group maximum is 127 quantise to themselves (d = 1), and with scale 1 and
    min 0 the output is the integer dot product itself: exact in float32 below 2^24."""
    n, k = 24, 512
    q, _, _ = _layer_tensors(n, k, group)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-127, 128, (3, k), generator=g).float()
    x.view(3, -1, group)[..., 0] = 127                               # every group's maximum is 127
    packed, params = int4_layout.pack(q, torch.ones(n, k // group), torch.zeros(n, k // group), group,
                                      torch.float32)
    y = kernels.int4_matmul(x, packed, params, group, n, isa_name=isa)
    assert torch.equal(y.double(), x.double() @ q.double().T)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5])
def test_integer_sums_are_exact_at_the_extremes(isa, rows):
    """The largest sums a group can reach (every code 15 or 0 against +-127, G = 256) stay exact where a pass
    of 1 to 4 (virtual) rows keeps the high nibbles in place (16 x their value, shifted back per group) and
    where a pass of more rows shifts them out first."""
    n, k, group = 32, 512, 256
    q = torch.full((n, k), 15, dtype=torch.uint8)
    q[1::2, 1::3] = 0                                                # rows of all 15 and rows mixing 15 / 0
    q[4] = torch.arange(k) % 16                                      # every code in both nibble positions
    x = torch.full((rows, k), -127.0)
    x[1::2] = 127.0
    x[:, 7::5] *= -1
    packed, params = int4_layout.pack(q, torch.ones(n, k // group), torch.zeros(n, k // group), group,
                                      torch.float32)
    exact = x.double() @ q.double().T                                # |values| < 2^24: exact in float32 too
    # bfloat16 x: one pass, `rows` rows a pass (y rounded once, as torch rounds); float32 x: three passes
    y = kernels.int4_matmul(x.bfloat16(), packed, params, group, n, isa_name=isa)
    assert torch.equal(y, exact.float().bfloat16())
    y = kernels.int4_matmul(x, packed, params, group, n, isa_name=isa)
    assert torch.equal(y.double(), exact)


def test_both_builds_give_the_same_bytes(compiled):
    if not compiled.cpu_supports("avx512"):
        pytest.skip("this CPU lacks avx512")
    q, s, m = _layer_tensors(70, 384, 128, torch.bfloat16)
    packed, params = int4_layout.pack(q, s, m, 128, torch.bfloat16)
    for dtype in (torch.bfloat16, torch.float32):
        x = _x(11, 384, dtype)
        assert torch.equal(kernels.int4_matmul(x, packed, params, 128, 70, isa_name="avx512"),
                           kernels.int4_matmul(x, packed, params, 128, 70, isa_name="avx2"))


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def test_amx_and_vpdpbusd_passes_give_the_same_bytes(compiled, tmp_path):
    """Products of 8 or more (virtual) rows run on AMX where the CPU has it (csrc/int4_amx.hpp); with
    QWENVL_INT4_AMX=0 (another process: the choice is made once) they run on vpdpbusd. Same integer sums,
    same float steps: the same bytes, for each group size's step (64 inputs, or 32 where G is an odd
    multiple of 32), float32 and bfloat16 parameters, Q4_K's super-blocks, and 8 to 48 virtual rows; groups
    over 256 inputs (GPTQ's one group a row) stay on vpdpbusd."""
    if not compiled.cpu_supports("avx512") or not {"amx_tile", "amx_int8"} <= _cpu_flags():
        pytest.skip("this CPU lacks AVX-512 or AMX-INT8")
    script = (
        "import sys, torch\n"
        "from qwenvl import kernels\n"
        "from qwenvl.kernels import int4_layout\n"
        "cases = torch.load(sys.argv[1])\n"
        "torch.save([kernels.int4_matmul(x, p, prm, g, n, isa_name='avx512') for x, p, prm, g, n in cases], "
        "sys.argv[2])\n")
    cases = []
    for group, param_dtype in [(128, torch.bfloat16), (96, torch.float32), (32, torch.float32), (256, torch.float32),
                               (768, torch.float32)]:                # one group a row: vpdpbusd both times
        q, s, m = _layer_tensors(40, 768, group, param_dtype, seed=group)
        packed, params = int4_layout.pack(q, s, m, group, param_dtype)
        for rows, dtype in [(8, torch.bfloat16), (9, torch.bfloat16), (16, torch.bfloat16), (3, torch.float32),
                            (16, torch.float32)]:
            cases.append((_x(rows, 768, dtype, seed=rows), packed, params, group, 40))
    packed, sb, _ = _q4_k_both_forms(40, 768)
    cases.append((_x(12, 768, torch.bfloat16), packed, sb, 32, 40))
    torch.save(cases, tmp_path / "cases.pt")
    env = dict(os.environ, QWENVL_INT4_AMX="0")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cases.pt"), str(tmp_path / "y.pt")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for (x, packed, params, group, n), y in zip(cases, torch.load(tmp_path / "y.pt")):
        assert torch.equal(kernels.int4_matmul(x, packed, params, group, n, isa_name="avx512"), y), \
            (group, params.dtype, tuple(x.shape), x.dtype)


def test_one_and_two_threads_give_the_same_bytes(isa):
    q, s, m = _layer_tensors(1000, 2048, 128, torch.bfloat16)       # 63 tiles of 16 KB: split over threads
    packed, params = int4_layout.pack(q, s, m, 128, torch.bfloat16)
    x = _x(8, 2048, torch.bfloat16)
    results = at_thread_counts(lambda: kernels.int4_matmul(x, packed, params, 128, 1000, isa_name=isa))
    assert torch.equal(results[0], results[1])


def test_bad_arguments_are_clear_errors():
    q, s, m = _layer_tensors(16, 128, 32)
    packed, params = int4_layout.pack(q, s, m, 32, torch.float32)
    x = torch.randn(2, 128)
    with pytest.raises(RuntimeError, match="packed must be contiguous uint8"):
        kernels.int4_matmul(x, packed[:, :32].contiguous(), params, 32, 16)
    with pytest.raises(RuntimeError, match="params must be"):
        kernels.int4_matmul(x, packed, params.double(), 32, 16)
    with pytest.raises(RuntimeError, match="1 to 16"):
        kernels.int4_matmul(torch.randn(17, 128), packed, params, 32, 16)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.int4_matmul(x.half(), packed, params, 32, 16)


# ----------------------------------------------------------------------------- switch and fallback
def test_the_mode_switch(monkeypatch, compiled):
    monkeypatch.setenv(kernels.MODE_ENV, "off")
    assert kernels.isa() is None and not kernels.available()
    assert Int4Linear.from_weight(torch.randn(32, 128), 32, None).layout == LAYOUT_INT4PACK
    monkeypatch.setenv(kernels.MODE_ENV, "avx2")
    assert kernels.isa() == "avx2"
    layer = Int4Linear.from_weight(torch.randn(40, 128), 32, None)
    assert layer.layout == LAYOUT_TILES
    x = torch.randn(3, 128, dtype=torch.float32)
    assert torch.equal(layer(x), kernels.int4_matmul(x, layer.packed, layer.group_params, 32, 40, isa_name="avx2"))
    monkeypatch.setenv(kernels.MODE_ENV, "fast")
    with pytest.raises(ValueError, match="QWENVL_KERNELS='fast'.*auto, avx512, avx2, off"):
        kernels.isa()


def test_hidden_module_warns_once_and_falls_back_to_the_same_answers(monkeypatch):
    w = torch.randn(200, 256) * 0.05
    x = torch.randn(4, 256)
    with_kernels = Int4Linear.from_weight(w, 64, None)
    assert with_kernels.layout == LAYOUT_TILES
    monkeypatch.setattr(build, "_loaded", (None, "hidden by the test"))
    monkeypatch.setattr(kernels, "_warned", set())
    kernels._forget()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fallback = Int4Linear.from_weight(w, 64, None)
            fallback(x)
            Int4Linear.from_weight(w, 64, None)(x)
        assert [str(c.message) for c in caught] == [
            "qwenvl: CPU kernels unavailable (hidden by the test); using PyTorch's kernels instead"]
        assert fallback.layout == LAYOUT_INT4PACK
        torch.testing.assert_close(fallback.dequantize(), with_kernels.dequantize(), rtol=0, atol=1e-6)
        # float32 activations: the kernel's three passes are within ~1e-6 of the exact product
        torch.testing.assert_close(fallback(x), with_kernels(x), rtol=0, atol=2e-5)
        # a layer built with the kernels still answers (through the dequantised GEMM) once they are gone
        torch.testing.assert_close(with_kernels(x), fallback(x), rtol=0, atol=2e-5)
    finally:
        kernels._forget()


def test_no_compiler_is_one_warning_naming_it(tmp_path):
    """A fresh process whose compiler is missing and whose cache is empty: one warning with the cause,
    then PyTorch's int4 kernel with the same answers."""
    script = (
        "import warnings, torch\n"
        "warnings.simplefilter('always')\n"
        "from qwenvl.layers.quantized_linear import Int4Linear\n"
        "torch.manual_seed(0)\n"
        "w, x = torch.randn(64, 128), torch.randn(2, 128)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    layer = Int4Linear.from_weight(w, 32, None)\n"
        "    y = layer(x)\n"
        "print(layer.layout)\n"
        "print([str(c.message) for c in caught])\n"
        "torch.save(y, %r)\n" % str(tmp_path / "y.pt"))
    env = dict(os.environ, CXX="/nonexistent/g++", QWENVL_KERNELS_CACHE=str(tmp_path / "cache"))
    env.pop(kernels.MODE_ENV, None)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    layout, messages = out.stdout.strip().splitlines()[-2:]
    assert layout == LAYOUT_INT4PACK
    assert messages == str(["qwenvl: CPU kernels unavailable (no C++ compiler (/nonexistent/g++) on PATH); "
                            "using PyTorch's kernels instead"])
    torch.manual_seed(0)
    w, x = torch.randn(64, 128), torch.randn(2, 128)
    ours = Int4Linear.from_weight(w, 32, None)
    assert ours.layout == LAYOUT_TILES
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), ours(x), rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------------- model level
def test_every_int4_layer_of_a_moe_model_runs_the_kernel(tiny_checkpoint, monkeypatch):
    """Qwen3-VL MoE under int4: the attention, the experts and the head are tile-layout Int4Linears, and a
    decode step's products go through the kernel (counted), in bfloat16 (one activation pass) too."""
    from qwenvl.layers.quantized_moe import QuantizedExperts
    from qwenvl.checkpoints.loader import load_model
    from qwenvl.checkpoints.quantize import LoadQuantizer
    from quant_helpers import tiny_logits

    model, _ = load_model(tiny_checkpoint("qwen3_vl_moe"), dtype="bfloat16", quantizer=LoadQuantizer("int4"))
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert layers and all(m.layout == LAYOUT_TILES for m in layers)
    experts = [lin for m in model.modules() if isinstance(m, QuantizedExperts) for lin in (*m.gate_up, *m.down)]
    assert experts and all(isinstance(lin, Int4Linear) for lin in experts)
    dense = {m.packed.data_ptr() for m in layers} - {lin.packed.data_ptr() for lin in experts}
    called = []
    real, real_pairs = kernels.int4_matmul, kernels.int4_matmul_pairs

    def counted(x, packed, *args, **kw):
        called.append(packed.data_ptr())
        return real(x, packed, *args, **kw)

    def counted_pairs(x, rows, packed, *args, **kw):                # the experts at decode: one call, many weights
        called.extend(p.data_ptr() for p in packed)
        return real_pairs(x, rows, packed, *args, **kw)
    monkeypatch.setattr(kernels, "int4_matmul", counted)
    monkeypatch.setattr(kernels, "int4_matmul_pairs", counted_pairs)
    logits = tiny_logits(model, torch.tensor([3, 17, 60]))          # 3 rows: every product in the kernel
    assert torch.isfinite(logits).all()
    assert dense <= set(called)                                     # attention, dense layers, the head
    assert set(called) - dense                                      # and the experts the router chose


# ------------------------------------------------------------------- Q4_K's super-block parameters
def _q4_k_tensors(n, k, seed=0):
    """Q4_K's fields: q, d and -dmin in float16 (some of them subnormal), sc and m 6-bit integers."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    d = (torch.rand(n, k // 256, generator=g) * 2e-3).half()
    neg_dmin = (-torch.rand(n, k // 256, generator=g) * 4e-3).half()
    sc = torch.randint(0, 64, (n, k // 32), dtype=torch.uint8, generator=g)
    m = torch.randint(0, 64, (n, k // 32), dtype=torch.uint8, generator=g)
    return q, d, neg_dmin, sc, m


def _q4_k_both_forms(n, k, seed=0):
    """(packed, super-block params, the float32 form's params) of one Q4_K matrix."""
    q, d, neg_dmin, sc, m = _q4_k_tensors(n, k, seed)
    scales = (d.float()[..., None] * sc.float().view(n, -1, 8)).view(n, -1)       # exact in float32
    mins = (neg_dmin.float()[..., None] * m.float().view(n, -1, 8)).view(n, -1)
    packed, fp32 = int4_layout.pack(q, scales, mins, 32, torch.float32)
    return packed, int4_layout.pack_super_blocks(d, neg_dmin, sc, m), fp32


def test_super_blocks_hold_the_float32_forms_values():
    q, d, neg_dmin, sc, m = _q4_k_tensors(37, 512)
    packed, sb, fp32 = _q4_k_both_forms(37, 512)
    assert sb.shape == (3, 2, 320) and sb.dtype == torch.uint8          # 4.625 bits a weight with the codes
    for a, b in zip(int4_layout.unpack_params(sb), int4_layout.unpack_params(fp32)):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    # the documented bytes: tile 1, super-block 1, row 3 (row 19): d at 2 * 3, -dmin at 32 + 2 * 3, the sc
    # of its group 5 (group 13 of the row) at 64 + 16 * 5 + 3, its m at 192 + 16 * 5 + 3
    block = sb[1, 1]
    assert block[6:8].view(torch.float16) == d[19, 1] and block[38:40].view(torch.float16) == neg_dmin[19, 1]
    assert block[64 + 83] == sc[19, 13] and block[192 + 83] == m[19, 13]
    w = int4_layout.dequantize(packed, sb, 512, 32, torch.float32)
    assert torch.equal(w, int4_layout.dequantize(packed, fp32, 512, 32, torch.float32))
    ids = torch.tensor([0, 15, 16, 36, 19])
    assert torch.equal(int4_layout.dequantize_rows(packed, sb, 512, 32, ids, torch.float32), w[ids])


@pytest.mark.parametrize("n,k", [(1, 256), (17, 512), (45, 768)])
def test_super_block_product_is_the_float32_forms_to_the_bit(isa, n, k):
    """The kernel forms d * sc and -dmin * m exactly, so its result is the float32 form's, byte for byte,
    for every row count (row blocks of 8 / 4 and their remainders), and within the reference's bound."""
    packed, sb, fp32 = _q4_k_both_forms(n, k)
    for dtype in (torch.bfloat16, torch.float32):
        for rows in range(1, 17):
            x = _x(rows, k, dtype, seed=rows)
            y = kernels.int4_matmul(x, packed, sb, 32, n, isa_name=isa)
            assert torch.equal(y, kernels.int4_matmul(x, packed, fp32, 32, n, isa_name=isa)), (dtype, rows)
            if rows in (1, 9, 16):
                want, bound = reference.int4_matmul(x, packed, sb, 32, n, kernels.ACTIVATION_PASSES[dtype])
                slack = want.abs() * 2.0 ** -8 if dtype == torch.bfloat16 else 0
                assert ((y.double() - want).abs() <= bound + slack).all()


def test_super_block_integer_sums_are_exact(isa):
    """d = 1, sc = 1, m = 0 and integer activations with 127 in every group: the integer dot product."""
    n, k = 24, 512
    q = _q4_k_tensors(n, k)[0]
    sb = int4_layout.pack_super_blocks(torch.ones(n, 2, dtype=torch.float16), torch.zeros(n, 2, dtype=torch.float16),
                                       torch.ones(n, 16, dtype=torch.uint8), torch.zeros(n, 16, dtype=torch.uint8))
    x = torch.randint(-127, 128, (3, k), generator=torch.Generator().manual_seed(3)).float()
    x.view(3, -1, 32)[..., 0] = 127
    y = kernels.int4_matmul(x, int4_layout.pack_codes(q), sb, 32, n, isa_name=isa)
    assert torch.equal(y.double(), x.double() @ q.double().T)


def test_super_blocks_give_the_same_bytes_on_both_builds_and_thread_counts(compiled):
    packed, sb, _ = _q4_k_both_forms(1000, 2048)                       # 63 tiles: split over threads
    x = _x(8, 2048, torch.bfloat16)
    isas = [isa_name for isa_name in ISAS if compiled.cpu_supports(isa_name)]
    per_count = at_thread_counts(lambda: [kernels.int4_matmul(x, packed, sb, 32, 1000, isa_name=i) for i in isas])
    results = [y for ys in per_count for y in ys]
    assert all(torch.equal(results[0], r) for r in results[1:])


def test_super_block_arguments_are_checked():
    packed, sb, _ = _q4_k_both_forms(16, 512)
    x = torch.randn(2, 512)
    with pytest.raises(RuntimeError, match="super-block params need group size 32"):
        kernels.int4_matmul(x, packed, sb, 64, 16)
    with pytest.raises(RuntimeError, match="super-block params need"):
        kernels.int4_matmul(x, packed, sb[:, :1].contiguous(), 32, 16)
    with pytest.raises(ValueError, match="do not fit together"):
        q, d, neg_dmin, sc, m = _q4_k_tensors(16, 512)
        int4_layout.pack_super_blocks(d, neg_dmin, sc[:, :8], m)


def test_int4_linear_from_q4_k_in_both_layouts():
    """The tile layout holds the super-blocks (and answers as the float32 form); PyTorch's int4pack layout
    gets the products (its offsets rounded once, as before)."""
    q, d, neg_dmin, sc, m = _q4_k_tensors(48, 512)
    layer = Int4Linear.from_q4_k(q, d, neg_dmin, sc, m, None, torch.float32, layout=LAYOUT_TILES)
    scales = (d.float()[..., None] * sc.float().view(48, -1, 8)).view(48, -1)
    mins = (neg_dmin.float()[..., None] * m.float().view(48, -1, 8)).view(48, -1)
    fp32 = Int4Linear.from_scales_and_mins(q, scales, mins, 32, None, layout=LAYOUT_TILES)
    assert layer.super_blocks and not fp32.super_blocks and layer.group_params.dtype == torch.uint8
    assert torch.equal(layer.dequantize(), fp32.dequantize())
    assert torch.equal(layer.dequantized_rows(torch.tensor([[3, 47]])), fp32.dequantize()[[3, 47]][None])
    for dtype in (torch.float32, torch.bfloat16):
        x = _x(3, 512, dtype)
        assert torch.equal(layer(x), fp32(x))
        assert torch.equal(layer(_x(20, 512, dtype)), fp32(_x(20, 512, dtype)))    # prefill: dequantised GEMM
    assert Int4Linear.stacked([layer, fp32], None) is None                          # forms are not mixed
    both = Int4Linear.stacked([layer, layer], None)
    assert both.super_blocks and torch.equal(both(_x(2, 512, torch.float32))[:, 48:], layer(_x(2, 512, torch.float32)))
    fallback = Int4Linear.from_q4_k(q, d, neg_dmin, sc, m, None, torch.float32, layout=LAYOUT_INT4PACK)
    assert fallback.layout == LAYOUT_INT4PACK
    torch.testing.assert_close(fallback.dequantize(), fp32.dequantize(), rtol=0, atol=1e-6)


def test_q4_k_blocks_repack_in_one_pass_as_the_python_pack():
    """kernels.q4_k_to_tiles (C++, straight from a GGUF tensor's bytes) gives the bytes that
    int4_layout.pack_codes + pack_super_blocks give for the fields the GGUF loader's Python path decodes."""
    from qwenvl.checkpoints.gguf.weights import q4_k_fields
    rows, k = 37, 768
    g = torch.Generator().manual_seed(5)
    blocks = torch.randint(0, 256, (rows, k // 256 * 144), dtype=torch.uint8, generator=g)
    packed, params = kernels.q4_k_to_tiles(blocks, k)
    q, d, neg_dmin, sc, m = q4_k_fields(blocks.view(rows, k // 256, 144), rows, k)
    assert torch.equal(packed, int4_layout.pack_codes(q))
    assert torch.equal(params, int4_layout.pack_super_blocks(d, neg_dmin, sc, m))
    with pytest.raises(RuntimeError, match="not a multiple of 256"):
        kernels.q4_k_to_tiles(blocks, 700)
    with pytest.raises(RuntimeError, match="blocks must be contiguous uint8"):
        kernels.q4_k_to_tiles(blocks[:, :144].contiguous(), k)
