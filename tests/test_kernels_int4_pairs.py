"""The int4 kernel's multi-weight call (kernels.int4_matmul_pairs, Int4Linear.products_by_pair): each pair's
row is the single-weight kernel's, bit for bit, whatever the pairing, the parameter form, the ISA or the
thread count; bad pairings are refused by name; and a MoE layer's int4 experts run their decode through it,
equal to the same arithmetic done expert by expert, with PyTorch's grouped path where the kernel cannot run."""

from __future__ import annotations

import pytest
import torch

from qwenvl import kernels
from qwenvl.layers import quantized_moe
from qwenvl.layers.activations import silu_mul
from qwenvl.layers.quantized_linear import Int4Linear, Int8Linear
from qwenvl.layers.quantized_moe import QuantizedExperts
from kernel_fixtures import at_thread_counts, compiled, isa  # noqa: F401  (fixtures: the compiled kernels)


def _int4_layers(count, out_features, in_features, group, dtype, seed=0):
    torch.manual_seed(seed)
    return [Int4Linear.from_float(torch.nn.Linear(in_features, out_features, bias=False).to(dtype), group_size=group)
            for _ in range(count)]


def _x(rows, k, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    x[:, 3] *= 30                                      # an outlier channel
    return x.to(dtype)


def _one_by_one(layers, x, rows, isa_name):
    """The single-weight kernel, pair by pair: what each row of the pairs call must equal."""
    return torch.cat([kernels.int4_matmul(x[r:r + 1].contiguous(), layer.packed, layer.group_params,
                                          layer.group_size, layer.out_features, isa_name)
                      for layer, r in zip(layers, rows)])


@pytest.mark.parametrize("dtype, group, out_features", [(torch.bfloat16, 128, 40), (torch.bfloat16, 32, 16),
                                                        (torch.float32, 64, 33), (torch.float32, 128, 200)])
def test_each_pair_is_the_single_weight_product_bit_for_bit(isa, dtype, group, out_features):
    layers = _int4_layers(5, out_features, 256, group, dtype)
    x = _x(3, 256, dtype)
    pairs = [layers[0], layers[3], layers[3], layers[1], layers[4], layers[0]]   # an expert chosen twice
    rows = [0, 2, 1, 1, 0, 2]
    y = kernels.int4_matmul_pairs(x, rows, [m.packed for m in pairs], [m.group_params for m in pairs], group,
                                  out_features, isa)
    assert y.dtype == dtype and y.shape == (6, out_features)
    assert torch.equal(y, _one_by_one(pairs, x, rows, isa))


def test_q4_k_super_block_experts_pair_too(isa):
    """GGUF's Q4_K experts keep Q4_K's super-blocks (a uint8 parameter form): the pairs call takes them."""
    g = torch.Generator().manual_seed(3)
    n, k = 48, 512
    layers = [Int4Linear.from_q4_k(torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g),
                                   (torch.rand(n, k // 256, generator=g) * 0.01).half(),
                                   (torch.rand(n, k // 256, generator=g) * 0.01).half(),
                                   torch.randint(0, 64, (n, k // 32), dtype=torch.uint8, generator=g),
                                   torch.randint(0, 64, (n, k // 32), dtype=torch.uint8, generator=g),
                                   None, torch.bfloat16) for _ in range(3)]
    assert all(m.super_blocks for m in layers)
    x = _x(2, k, torch.bfloat16)
    rows = [1, 0, 1]
    y = kernels.int4_matmul_pairs(x, rows, [m.packed for m in layers], [m.group_params for m in layers], 32, n, isa)
    assert torch.equal(y, _one_by_one(layers, x, rows, isa))


def test_pairs_do_not_depend_on_the_thread_count():
    layers = _int4_layers(8, 2048, 512, 128, torch.bfloat16)     # enough tiles to split across threads
    x = _x(2, 512, torch.bfloat16)
    rows = [0, 1] * 4
    one, two = at_thread_counts(lambda: Int4Linear.products_by_pair(layers, x, rows))
    assert torch.equal(one, two)


def test_bad_pairings_are_refused_by_name(isa):
    layers = _int4_layers(2, 32, 128, 64, torch.bfloat16)
    x = _x(2, 128, torch.bfloat16)
    packed, params = [m.packed for m in layers], [m.group_params for m in layers]
    with pytest.raises(RuntimeError, match="one of each per pair"):
        kernels.int4_matmul_pairs(x, [0], packed, params, 64, 32, isa)
    with pytest.raises(RuntimeError, match="names row 2 of x's 2"):
        kernels.int4_matmul_pairs(x, [0, 2], packed, params, 64, 32, isa)
    with pytest.raises(RuntimeError, match="packed must be contiguous uint8"):
        kernels.int4_matmul_pairs(x, [0, 1], packed, params, 64, 48, isa)   # out_features of another shape


def test_pairs_run_in_kernel_only_for_one_shape_of_plain_int4_layers():
    layers = _int4_layers(2, 32, 128, 64, torch.bfloat16)
    assert Int4Linear.pairs_run_in_kernel(layers)
    assert not Int4Linear.pairs_run_in_kernel(layers + _int4_layers(1, 48, 128, 64, torch.bfloat16))
    assert not Int4Linear.pairs_run_in_kernel(layers + _int4_layers(1, 32, 128, 32, torch.bfloat16))
    int8 = Int8Linear.from_float(torch.nn.Linear(128, 32, bias=False).to(torch.bfloat16))
    assert not Int4Linear.pairs_run_in_kernel(layers + [int8])


# ------------------------------------------------------------------------------------- MoE experts
H, I, E = 256, 128, 6


def _experts(dtype=torch.bfloat16, seed=0):
    gate_up = _int4_layers(E, 2 * I, H, 128, dtype, seed)
    down = _int4_layers(E, H, I, 128, dtype, seed + 1)
    return QuantizedExperts(gate_up, down, I)


def _route(tokens, k, seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, k, generator=g), dim=-1)
    return weights, ids


def _expert_by_expert(experts, x, weights, ids):
    """The pair path's arithmetic with one layer call per (token, expert): each layer's own forward, the
    same silu * up, the k terms summed in float32 in the router's order."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(ids.shape[0]):
        for j, e in enumerate(ids[t].tolist()):
            h = silu_mul(experts.gate_up[e](x[t:t + 1].contiguous()))
            out[t] += experts.down[e](h)[0].float() * weights[t, j].float()
    return out.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens, k", [(1, 2), (3, 4)])
def test_moe_decode_runs_pairs_in_two_kernel_calls(monkeypatch, dtype, tokens, k):
    experts = _experts(dtype)
    x = _x(tokens, H, dtype)
    weights, ids = _route(tokens, k)
    weights = weights.to(dtype)
    calls = []
    real = kernels.int4_matmul_pairs
    monkeypatch.setattr(kernels, "int4_matmul_pairs", lambda *a, **kw: calls.append(len(a[1])) or real(*a, **kw))
    y = experts(x, weights, ids)
    assert calls == [tokens * k, tokens * k]                     # all gate/up products, then all down products
    assert torch.equal(y, _expert_by_expert(experts, x, weights, ids))
    grouped = experts._grouped(x, weights, ids)                  # PyTorch's path: the same up to its bf16 sums
    torch.testing.assert_close(y, grouped, rtol=2e-2, atol=2e-2 * grouped.abs().max().item())


def test_moe_falls_back_to_the_grouped_path(monkeypatch):
    """More pairs than the pair path takes, or the kernels off: the grouped path, with its own numbers."""
    experts = _experts()
    x = _x(2, H, torch.bfloat16)
    weights, ids = _route(2, 3)
    weights = weights.to(torch.bfloat16)
    monkeypatch.setattr(kernels, "int4_matmul_pairs", lambda *a, **kw: pytest.fail("pair kernel called"))
    monkeypatch.setattr(quantized_moe, "PAIR_KERNEL_MAX_PAIRS", 5)
    assert torch.equal(experts(x, weights, ids), experts._grouped(x, weights, ids))
    monkeypatch.setattr(quantized_moe, "PAIR_KERNEL_MAX_PAIRS", 64)
    monkeypatch.setenv("QWENVL_KERNELS", "off")
    assert torch.equal(experts(x, weights, ids), experts._grouped(x, weights, ids))


def test_moe_with_experts_the_kernel_cannot_pair_uses_the_grouped_path(monkeypatch):
    experts = _experts()
    experts.down[2] = Int8Linear.from_float(torch.nn.Linear(I, H, bias=False).to(torch.bfloat16))
    fresh = QuantizedExperts(list(experts.gate_up), list(experts.down), I)     # decided at first use
    x = _x(1, H, torch.bfloat16)
    weights, ids = _route(1, 3)
    monkeypatch.setattr(kernels, "int4_matmul_pairs", lambda *a, **kw: pytest.fail("pair kernel called"))
    y = fresh(x, weights.to(torch.bfloat16), ids)
    assert torch.equal(y, fresh._grouped(x, weights.to(torch.bfloat16), ids))
