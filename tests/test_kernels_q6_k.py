"""GGUF Q6_K in C++ (qwenvl/kernels/csrc/q6_k.cpp) against its references: gguf's own dequantisation (the
values, bit for bit) and the loader's Python path, gguf's values through Int4Linear.from_weight (the int4
tiles and group parameters, byte for byte)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from kernel_fixtures import at_thread_counts, compiled  # noqa: F401  (compiled: every test needs the build)

from qwenvl import kernels
from qwenvl.layers.quantized_linear import LAYOUT_TILES, Int4Linear

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from gguf_rewrite import quantize_q6_k  # noqa: E402

BLOCK = 210          # bytes per 256 weights: ql[128], qh[64], int8 scales[16], fp16 d


def _gguf_values(blocks: torch.Tensor, cols: int) -> torch.Tensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    return torch.from_numpy(dequantize(blocks.numpy(), GGMLQuantizationType.Q6_K).astype(np.float32)).view(-1, cols)


def _weights(rows: int, cols: int, seed: int) -> np.ndarray:
    """Weights with the spread of a real matrix: mostly small, some rows and columns larger, a few outliers."""
    g = np.random.default_rng(seed)
    w = g.standard_normal((rows, cols)).astype(np.float32) * 0.02
    w *= g.uniform(0.2, 3.0, (rows, 1)).astype(np.float32)
    w[g.random((rows, cols)) < 0.002] *= 40
    w[:, :16] = 0.0                            # an all-zero group of 16 (its scale and codes 0)
    return w


def _random_blocks(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Every bit pattern of codes and scales (-128..127); d any finite fp16: normal, subnormal, zero, negative."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (rows, cols // 256, BLOCK), dtype=torch.uint8, generator=g)
    d = (torch.randn(rows, cols // 256, generator=g) * 1e-3).to(torch.float16)
    d[0, 0], d[-1, -1] = 0.0, -2.0 ** -20                # zero and a subnormal
    d.view(-1)[1::7] = torch.tensor(3.0e-6, dtype=torch.float16)   # subnormal
    blocks[..., 208:] = d.unsqueeze(-1).view(torch.uint8)
    return blocks.view(rows, -1)


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


@pytest.mark.parametrize("rows, cols", [(37, 512), (1, 256), (16, 1536)])
def test_q6_k_dequantize_is_gguf_to_the_bit(rows, cols):
    """Real Q6_K bytes (quantised from weights) and random ones (every code, scale and fp16 d form): the C++
    values are gguf.quants.dequantize's, bit for bit."""
    for blocks in (torch.from_numpy(quantize_q6_k(_weights(rows, cols, rows))), _random_blocks(rows, cols, cols)):
        got = kernels.q6_k_dequantize(blocks, cols)
        want = _gguf_values(blocks, cols)
        assert got.shape == (rows, cols)
        assert torch.equal(_as_bits(got), _as_bits(want))


def test_q6_k_quantiser_gives_the_weights_back_within_its_step():
    """The test files' Q6_K (bench/gguf_rewrite.py) is a real quantisation: within each group's step d * |sc|
    (half a step, or a whole one where a value of the other sign as large as the extreme, which takes -32,
    would need +32 of the codes -32..31), plus what the scale's rounding to a multiple of d moves the group's
    extreme (32 codes x d / 2); and its scales carry both signs."""
    w = _weights(8, 512, 3)
    blocks = quantize_q6_k(w)
    back = _gguf_values(torch.from_numpy(blocks), 512).numpy()
    b = blocks.reshape(8, 2, BLOCK)
    d = b[..., 208:].copy().view(np.float16).astype(np.float32)                # [8, 2, 1]
    scales = b[..., 192:208].view(np.int8)                                      # [8, 2, 16]
    bound = (d * np.abs(scales) + 16 * d).reshape(8, 32, 1)
    assert (np.abs(back - w).reshape(8, 32, 16) <= bound * 1.001 + 1e-9).all()
    assert (scales > 0).any() and (scales < 0).any()


def _python_path(blocks: torch.Tensor, cols: int, group: int, dtype: torch.dtype) -> Int4Linear:
    """The loader's reference path: gguf's values in the model's dtype, then qwenvl's own int4 quantiser."""
    return Int4Linear.from_weight(_gguf_values(blocks, cols).to(dtype), group, None, layout=LAYOUT_TILES)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows, cols, group", [(37, 512, 128), (16, 768, 32), (5, 256, 64), (40, 1536, 128)])
def test_q6_k_to_int4_tiles_is_the_python_requantisation(dtype, rows, cols, group):
    """kernels.q6_k_to_int4_tiles gives the packed codes and group parameters byte for byte that gguf's values
    through Int4Linear.from_weight give (odd row counts: the last tile's padding too)."""
    blocks = torch.from_numpy(quantize_q6_k(_weights(rows, cols, rows + cols)))
    packed, params = kernels.q6_k_to_int4_tiles(blocks, cols, group, dtype)
    ref = _python_path(blocks, cols, group, dtype)
    assert params.dtype == ref.group_params.dtype == dtype
    assert torch.equal(packed, ref.packed)
    assert torch.equal(_as_bits(params), _as_bits(ref.group_params))


def test_q6_k_to_int4_tiles_on_random_blocks():
    """Random blocks (every code and scale; subnormal and zero d): still the Python path's bytes."""
    rows, cols = 33, 512
    blocks = _random_blocks(rows, cols, 11)
    for dtype in (torch.bfloat16, torch.float32):
        packed, params = kernels.q6_k_to_int4_tiles(blocks, cols, 128, dtype)
        ref = _python_path(blocks, cols, 128, dtype)
        assert torch.equal(packed, ref.packed) and torch.equal(_as_bits(params), _as_bits(ref.group_params))


def test_q6_k_results_do_not_depend_on_the_thread_count():
    rows, cols = 70, 512
    blocks = torch.from_numpy(quantize_q6_k(_weights(rows, cols, 9)))
    one, two = at_thread_counts(lambda: (kernels.q6_k_dequantize(blocks, cols),
                                         *kernels.q6_k_to_int4_tiles(blocks, cols, 128, torch.bfloat16)))
    for a, b in zip(one, two):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_q6_k_bad_input_is_refused_with_the_reason():
    blocks = torch.from_numpy(quantize_q6_k(_weights(4, 512, 1)))
    with pytest.raises(RuntimeError, match="not a multiple of 256"):
        kernels.q6_k_dequantize(blocks, 500)
    with pytest.raises(RuntimeError, match="blocks must be contiguous uint8"):
        kernels.q6_k_dequantize(blocks[:, :BLOCK].contiguous(), 512)
    with pytest.raises(RuntimeError, match="group size 48"):
        kernels.q6_k_to_int4_tiles(blocks, 512, 48, torch.bfloat16)
    with pytest.raises(ValueError, match="float16 model is not supported"):
        kernels.q6_k_to_int4_tiles(blocks, 512, 128, torch.float16)
