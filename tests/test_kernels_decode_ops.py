"""qwenvl's element-wise decode kernels (csrc/decode_ops_kernel.hpp: residual add + RMSNorm, rotary in place,
silu(gate) * up, decode attention from the paged pool) against the plain-PyTorch reference of the same
arithmetic (qwenvl/kernels/reference.py) within the bounds derived there, both ISA builds, float32 and
bfloat16, odd sizes (tails shorter than a vector), several row counts, unequal context lengths over shuffled
blocks, 1 and 2 threads giving the same bytes; and clear errors for bad arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwenvl import kernels
from qwenvl.kernels import reference
from kernel_fixtures import at_thread_counts, compiled, isa  # noqa: F401  (fixtures: every test runs the compiled kernels)

DTYPES = (torch.float32, torch.bfloat16)


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor) -> None:
    err = (got.double() - want).abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"error exceeds the derived bound by {worst:.3g} (max error {err.max().item():.3g})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim", [(1, 1536), (3, 7), (5, 100), (40, 1024)])
def test_add_rms_norm_within_the_bound(isa, dtype, rows, dim):
    x = _randn(rows, dim, dtype=dtype, seed=1, scale=3.0)
    delta = _randn(rows, dim, dtype=dtype, seed=2)
    weight = _randn(dim, dtype=dtype, seed=3)
    for d in (delta, None):
        s, y = kernels.add_rms_norm(x, d, weight, 1e-6, isa_name=isa)
        s_ref, y_ref, bound = reference.add_rms_norm(x, d, weight, 1e-6)
        assert torch.equal(s, s_ref) and s.dtype == dtype and y.dtype == dtype
        _within(y, y_ref, bound)
        # and against the layers' PyTorch path (weight * F.rms_norm): in bfloat16 nearly every value has the
        # same bytes (only a float32 ulp of 1 / rms apart before the rounding)
        plain = weight * F.rms_norm(s_ref, (dim,), None, 1e-6)
        if dtype == torch.bfloat16:
            assert (y != plain).sum().item() <= 1 + 0.02 * y.numel()


def test_add_rms_norm_reads_strided_rows_and_threads_agree(isa):
    wide = _randn(64, 3000, dtype=torch.bfloat16, seed=4)
    x, delta = wide[:, :1500], wide[:, 1500:]                    # row stride 3000: views of one tensor
    weight = _randn(1500, dtype=torch.bfloat16, seed=5)
    one, two = at_thread_counts(lambda: kernels.add_rms_norm(x, delta, weight, 1e-5, isa_name=isa))
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert torch.equal(one[0], x + delta)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,heads,head_dim,extra", [(1, 14, 128, 256), (4, 3, 20, 0), (2, 5, 34, 7)])
def test_rotary_in_place_equals_the_reference_bit_for_bit(isa, dtype, rows, heads, head_dim, extra):
    x = _randn(rows, heads * head_dim + extra, dtype=dtype, seed=6)
    angles = _randn(rows, head_dim, seed=7, scale=3.0)            # the tables' second halves are not read
    cos, sin = angles.cos(), angles.sin()
    want = reference.rotary(x, heads, head_dim, cos, sin)
    got = kernels.rotary_(x.clone(), heads, head_dim, cos[:, : head_dim // 2], sin[:, : head_dim // 2], isa_name=isa)
    assert torch.equal(got, want)                                  # the columns past the heads untouched too


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inner", [(1, 8960), (3, 9), (16, 200)])
def test_silu_mul_within_the_bound(isa, dtype, rows, inner):
    gate_up = _randn(rows, 2 * inner, dtype=dtype, seed=8, scale=4.0)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -87.5])     # saturated exp, zero
    y = kernels.silu_mul(gate_up, isa_name=isa)
    want, bound = reference.silu_mul(gate_up)
    assert y.shape == (rows, inner) and y.dtype == dtype
    _within(y, want, bound)
    if dtype == torch.bfloat16:     # the PyTorch path's bytes nearly everywhere
        plain = F.silu(gate_up[:, :inner]) * gate_up[:, inner:]
        assert (y != plain).sum().item() <= 1 + 0.02 * y.numel()


def _pool_case(dtype, lens, block_size=4, hq=6, hkv=2, dh=32, seed=9, num_blocks=40):
    """A pool with random content, each sequence's blocks drawn shuffled from it, its new k/v."""
    g = torch.Generator().manual_seed(seed)
    k_pool = torch.randn(num_blocks * block_size, hkv, dh, generator=g).to(dtype)
    v_pool = torch.randn(num_blocks * block_size, hkv, dh, generator=g).to(dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, at = [], 0
    for n in lens:
        need = -(-n // block_size)
        tables.append(order[at: at + need])
        at += need
    qkv = torch.randn(len(lens), (hq + 2 * hkv) * dh, generator=g).to(dtype)     # one fused row a sequence
    q = qkv[:, : hq * dh].view(-1, hq, dh)
    k = qkv[:, hq * dh: (hq + hkv) * dh].view(-1, hkv, dh)
    v = qkv[:, (hq + hkv) * dh:].view(-1, hkv, dh)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    return q, k, v, k_pool, v_pool, tables, bt, torch.tensor(lens, dtype=torch.int32), block_size


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens,hq,hkv,dh", [([1], 2, 1, 16), ([37], 12, 2, 128), ([5, 17, 1, 30], 6, 2, 32),
                                            ([9, 3], 8, 8, 48)])
def test_paged_decode_attention_within_the_bound(isa, dtype, lens, hq, hkv, dh):
    q, k, v, kp, vp, tables, bt, cl, bs = _pool_case(dtype, lens, hq=hq, hkv=hkv, dh=dh)
    kp_ref, vp_ref = kp.clone(), vp.clone()
    for b, n in enumerate(lens):                       # where the kernel must write the step's k/v
        slot = tables[b][(n - 1) // bs] * bs + (n - 1) % bs
        kp_ref[slot], vp_ref[slot] = k[b], v[b]
    scale = dh ** -0.5
    out = kernels.paged_decode_attention(q, k, v, kp, vp, bt, cl, bs, scale, isa_name=isa)
    assert torch.equal(kp, kp_ref) and torch.equal(vp, vp_ref)
    want, bound = reference.paged_decode_attention(q, kp_ref, vp_ref, tables, lens, bs, scale)
    assert out.shape == q.shape and out.dtype == dtype
    _within(out, want, bound)


def test_paged_decode_attention_threads_agree_and_rows_are_independent(isa):
    lens = [50, 7, 23]
    case = _pool_case(torch.bfloat16, lens, hq=12, hkv=2, dh=64)
    q, k, v, kp, vp, tables, bt, cl, bs = case

    def run():
        return kernels.paged_decode_attention(q, k, v, kp.clone(), vp.clone(), bt, cl, bs, 0.125, isa_name=isa)
    one, two = at_thread_counts(run)
    assert torch.equal(one, two)
    alone = kernels.paged_decode_attention(q[1:2], k[1:2], v[1:2], kp.clone(), vp.clone(), bt[1:2], cl[1:2], bs,
                                           0.125, isa_name=isa)
    assert torch.equal(alone[0], one[1])


def test_bad_arguments_are_clear_errors():
    isa = kernels.isa()
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError, match="weight must be"):
        kernels.add_rms_norm(x, None, torch.randn(8, dtype=torch.bfloat16), 1e-6, isa_name=isa)
    with pytest.raises(RuntimeError, match="do not fit"):
        kernels.rotary_(x, 3, 4, torch.randn(2, 2), torch.randn(2, 2), isa_name=isa)
    with pytest.raises(RuntimeError, match="odd length"):
        kernels.silu_mul(torch.randn(2, 7), isa_name=isa)
    q, k, v, kp, vp, tables, bt, cl, bs = _pool_case(torch.float32, [5])
    with pytest.raises(RuntimeError, match="outside the pool"):
        kernels.paged_decode_attention(q, k, v, kp, vp, torch.full_like(bt, 1000), cl, bs, 1.0, isa_name=isa)
    with pytest.raises(RuntimeError, match="context"):
        kernels.paged_decode_attention(q, k, v, kp, vp, bt, cl + 100, bs, 1.0, isa_name=isa)


def _paged_decode_logits(model, ids: torch.Tensor, lag: int = 3) -> torch.Tensor:
    """logits [N, V] of two sequences fed one token a step through the paged pool (decode-only steps of
    two rows, the second sequence `lag` tokens behind so the context lengths differ, blocks shuffled):
    the first sequence's rows."""
    from qwenvl.layers.paged_attention import PagedAttention, PagedKVPool
    cfg = model.cfg.text
    head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    dtype = next(model.parameters()).dtype
    pool = PagedKVPool(cfg.num_hidden_layers, 16, 4, cfg.num_key_value_heads, head_dim, dtype=dtype)
    tables = [[9, 2, 14, 5], [0, 11, 7, 3]]
    out = []
    with torch.inference_mode():
        for i in range(ids.shape[0] + lag):
            rows = [(0, i)] if i < ids.shape[0] else []
            rows += [(1, i - lag)] if i >= lag else []
            attn = PagedAttention(pool, [tables[s] for s, _ in rows], [t + 1 for _, t in rows], [1] * len(rows))
            tok = torch.stack([ids[t] for _, t in rows])
            pos = torch.tensor([t for _, t in rows]).expand(3, -1)
            logits = model.compute_logits(model(tok, pos, attn, None, []))
            if rows[0][0] == 0:
                out.append(logits[:1])
    return torch.cat(out)


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("bfloat16", 0.02)])
def test_model_decodes_like_the_pytorch_path(tiny_checkpoint, monkeypatch, dtype, tolerance):
    """The tiny Qwen2-VL decoding through the paged pool with the decode kernels and with
    QWENVL_DECODE_OPS=off (the same weights, the same products): logits within `tolerance` of their norm
    (float32: the kernels' sums in another order, 2.9e-7 measured; bfloat16: a value may round to the
    other bf16 neighbour, identical bytes measured on this model), and the greedy token the same wherever the top two are further apart than
    the difference."""
    from qwenvl.checkpoints.loader import load_model
    model, _ = load_model(tiny_checkpoint("qwen2_vl"), dtype=dtype, fuse=True)
    ids = torch.randint(0, 300, (14,), generator=torch.Generator().manual_seed(3))
    monkeypatch.setenv(kernels.DECODE_STACK_ENV, "off")      # the ops called from the layers (test_decode_stack.py: in C++)
    calls = []
    for name in ("add_rms_norm", "rotary_", "silu_mul", "paged_decode_attention"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    got = _paged_decode_logits(model, ids).float()
    assert {"add_rms_norm", "rotary_", "silu_mul", "paged_decode_attention"} <= set(calls)
    calls.clear()
    monkeypatch.setenv(kernels.DECODE_OPS_ENV, "off")
    want = _paged_decode_logits(model, ids).float()
    assert not calls
    diff = (got - want).norm(dim=1)
    assert (diff / want.norm(dim=1)).max().item() < tolerance
    top2 = want.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * (got - want).abs().amax(dim=1)
    assert clear.any() and torch.equal(got.argmax(1)[clear], want.argmax(1)[clear])


def test_the_layers_keep_pytorchs_path_off_the_kernels(monkeypatch):
    """Kernels off (QWENVL_KERNELS=off or QWENVL_DECODE_OPS=off) or autograd on: the layers compute with
    PyTorch's ops, gradients flow; with the kernels, the layers' answers are the kernels'."""
    from qwenvl.layers.activations import silu_mul
    from qwenvl.layers.norms import RMSNorm
    from qwenvl.layers.rotary import rotate, rotate_heads
    calls = []
    for name in ("add_rms_norm", "rotary_", "silu_mul"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    norm = RMSNorm(48).bfloat16()
    with torch.no_grad():
        norm.weight.copy_(_randn(48, seed=11))
    x, delta = _randn(2, 48, dtype=torch.bfloat16, seed=12), _randn(2, 48, dtype=torch.bfloat16, seed=13)
    qkv = _randn(2, 3 * 32, dtype=torch.bfloat16, seed=14)
    angles = _randn(2, 32, seed=15)
    c, s = angles.cos()[:, None, :16], angles.sin()[:, None, :16]
    gate_up = _randn(2, 40, dtype=torch.bfloat16, seed=16)

    def run():
        with torch.no_grad():
            return (*norm.add_forward(x, delta), rotate_heads(qkv.clone(), 2, 32, c, s), silu_mul(gate_up.clone()))
    with_kernels = run()
    assert calls == ["add_rms_norm", "rotary_", "silu_mul"]
    for env in (kernels.MODE_ENV, kernels.DECODE_OPS_ENV):
        calls.clear()
        monkeypatch.setenv(env, "off")
        plain = run()
        monkeypatch.delenv(env)
        assert not calls
        assert torch.equal(plain[0], x + delta)
        assert torch.equal(plain[1], norm.weight * F.rms_norm(x + delta, (48,), None, norm.eps))
        assert torch.equal(plain[2], rotate(qkv[:, :64].view(2, 2, 32), c, s))
        assert torch.equal(plain[3], F.silu(gate_up[:, :20]) * gate_up[:, 20:])
        assert torch.equal(with_kernels[2], plain[2])                  # rotary: the same bytes either way
    xg = x.float().requires_grad_()
    norm32 = RMSNorm(48)
    s_, y = norm32.add_forward(xg, delta.float())
    y.sum().backward()
    assert xg.grad is not None and not calls


def test_a_step_reads_the_kernel_settings_once(monkeypatch):
    """Inside settings_read_once (the runner wraps each step in it) the kernels' choice is the one made on entry,
    nested or not; a change to the variables takes effect after it (the next step)."""
    monkeypatch.delenv(kernels.DECODE_OPS_ENV, raising=False)
    on = kernels.decode_ops_isa()
    assert on is not None
    with kernels.settings_read_once():
        monkeypatch.setenv(kernels.DECODE_OPS_ENV, "off")
        assert kernels.decode_ops_isa() == on
        with kernels.settings_read_once():
            assert kernels.decode_ops_isa() == on and kernels.isa() == on
    assert kernels.decode_ops_isa() is None
    monkeypatch.setenv(kernels.MODE_ENV, "off")
    with kernels.settings_read_once():
        assert kernels.isa() is None and not kernels.available()


def test_a_steps_kernel_settings_stay_on_its_thread(monkeypatch):
    """Another thread (an executor, a test) reads the environment as it is, while a step holds its snapshot."""
    import threading
    monkeypatch.delenv(kernels.DECODE_OPS_ENV, raising=False)
    on = kernels.decode_ops_isa()
    seen = []
    with kernels.settings_read_once():
        monkeypatch.setenv(kernels.DECODE_OPS_ENV, "off")
        t = threading.Thread(target=lambda: seen.append(kernels.decode_ops_isa()))
        t.start()
        t.join()
        assert kernels.decode_ops_isa() == on
    assert seen == [None]
