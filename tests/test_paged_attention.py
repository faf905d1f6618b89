"""Paged attention vs. a naive full-attention oracle: GQA, mixed chunk lengths, block boundaries."""

import random

import pytest
import torch

from qwenvl.layers.paged_attention import PagedAttention, PagedKVPool


def naive(q, k, v):
    """q[T, Hq, D], k/v[C, Hkv, D]; queries are the last T of C positions."""
    T, Hq, D = q.shape
    C, Hkv, _ = k.shape
    k = k.repeat_interleave(Hq // Hkv, dim=1)
    v = v.repeat_interleave(Hq // Hkv, dim=1)
    scores = torch.einsum("thd,chd->htc", q, k) / D ** 0.5
    qpos = torch.arange(C - T, C)[:, None]
    scores = scores.masked_fill(torch.arange(C)[None, :] > qpos, float("-inf"))
    return torch.einsum("htc,chd->thd", scores.softmax(-1), v)


def run_steps(impl, hq=4, hkv=2, d=8, bs=4, plan=None, seed=0, num_layers=2, device="cpu",
              dtype=torch.float32, tol=1e-5):
    """Feed sequences through several steps in chunks; compare each step with the oracle."""
    g = torch.Generator().manual_seed(seed)
    pool = PagedKVPool(num_layers, 64, bs, hkv, d, dtype, device)
    free = list(range(64))
    random.Random(seed).shuffle(free)           # non-contiguous block tables
    total = {}
    tables = {}
    hist = {}                                   # seq -> per-layer full k, v
    for step in plan:                           # step: list of (seq id, new tokens)
        bts, ctxs, qls = [], [], []
        for sid, n in step:
            c = total.get(sid, 0) + n
            bt = tables.setdefault(sid, [])
            while len(bt) * bs < c:
                bt.append(free.pop())
            total[sid] = c
            bts.append(bt); ctxs.append(c); qls.append(n)
        attn = PagedAttention(pool, bts, ctxs, qls, impl=impl)
        N = sum(qls)
        for layer in range(num_layers):
            q = torch.randn(N, hq, d, generator=g)
            k = torch.randn(N, hkv, d, generator=g)
            v = torch.randn(N, hkv, d, generator=g)
            out = attn.attend(layer, q.to(device, dtype), k.to(device, dtype), v.to(device, dtype))
            assert out.shape == (N, hq, d) and out.dtype == dtype
            out = out.float().cpu()
            q, k, v = (t.to(dtype).float() for t in (q, k, v))     # the oracle sees the same rounding
            s = 0
            for sid, n in step:
                ks, vs = hist.setdefault((sid, layer), (torch.empty(0, hkv, d), torch.empty(0, hkv, d)))
                ks = torch.cat([ks, k[s:s + n]]); vs = torch.cat([vs, v[s:s + n]])
                hist[(sid, layer)] = (ks, vs)
                torch.testing.assert_close(out[s:s + n], naive(q[s:s + n], ks, vs), atol=tol, rtol=tol)
                s += n


PLAN = [
    [("a", 7), ("b", 4), ("c", 1)],            # prefills of odd/exact-block/single length
    [("a", 1), ("b", 5), ("c", 9)],            # decode + chunks crossing block boundaries
    [("a", 1), ("b", 1), ("c", 1), ("d", 13)],
    [("d", 3), ("a", 1), ("c", 1)],
    [("a", 1), ("b", 1), ("c", 1), ("d", 1)],  # all decodes (padded batch)
]


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 4), (6, 1)])
def test_matches_naive(impl, hq, hkv):
    run_steps(impl, hq=hq, hkv=hkv, plan=PLAN)


def test_fast_equals_reference_and_block_size_one():
    run_steps("fast", bs=1, plan=PLAN)
    run_steps("reference", bs=16, plan=PLAN)


def test_slots_written_and_bad_args():
    pool = PagedKVPool(1, 4, 2, 1, 4)
    attn = PagedAttention(pool, [[3, 1]], [3], [3])
    assert attn.slot_mapping.tolist() == [6, 7, 2]
    k = torch.arange(12.0).view(3, 1, 4)
    attn.attend(0, torch.randn(3, 1, 4), k, k)
    assert torch.equal(pool.k[0][3].view(2, 4), k[:2, 0]) and torch.equal(pool.k[0][1, 0, 0], k[2, 0])
    with pytest.raises(ValueError):
        PagedAttention(pool, [[0]], [3], [1])     # 3 tokens in one 2-slot block
    with pytest.raises(ValueError):
        PagedAttention(pool, [[0]], [1], [1], impl="flash")
    assert PagedKVPool.bytes_per_block(2, 16, 2, 8, torch.bfloat16) == 2 * 2 * 16 * 2 * 8 * 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_cuda(impl, dtype, tol):
    run_steps(impl, hq=8, hkv=2, d=64, bs=16, plan=PLAN + [[("e", 40), ("a", 1)], [("e", 1), ("a", 1)]],
              device="cuda", dtype=dtype, tol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (6, 1)])
def test_fast_half_precision_on_cpu(dtype, tol, hq, hkv):
    """The CPU decode path (float32 matmuls over half-precision k/v) against the oracle, padded batch included."""
    run_steps("fast", hq=hq, hkv=hkv, plan=PLAN, dtype=dtype, tol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_decode_only_steps_through_the_kernel_match_naive(dtype, tol, monkeypatch):
    """head_dim 32 (a multiple of 16): decode-only steps go through qwenvl's decode-attention kernel (which
    writes the step's k/v itself); the mixed steps keep the PyTorch path. Both against the oracle."""
    from qwenvl import kernels
    if kernels.decode_ops_isa() is None:
        pytest.skip("qwenvl's kernels do not run here")
    calls = []
    real = kernels.paged_decode_attention
    monkeypatch.setattr(kernels, "paged_decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_steps("fast", hq=6, hkv=2, d=32, plan=PLAN, dtype=dtype, tol=tol)
    assert len(calls) == 2                       # PLAN's one decode-only step, once per layer
