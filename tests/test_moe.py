"""The sparse MoE block on its own: routing rule, both compute plans against a plain per-token loop,
experts nobody chose never touched, and which layers are sparse."""

import pytest
import torch

from qwenvl.models.config import TextConfig
from qwenvl.layers.moe import Experts, SparseMoeBlock, route

E, H, I, K = 6, 16, 8, 2


def _block(seed=0) -> SparseMoeBlock:
    torch.manual_seed(seed)
    b = SparseMoeBlock(H, I, E, K)
    with torch.no_grad():
        for p in b.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return b


def _naive(b: SparseMoeBlock, x: torch.Tensor) -> torch.Tensor:
    """Per token, per chosen expert, straight from the definition."""
    probs = torch.softmax(b.gate(x).float(), -1)
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        top, ids = torch.topk(probs[n], K)
        top = top / top.sum()
        for w, e in zip(top, ids):
            gate, up = (b.experts.gate_up_proj[e] @ x[n]).split(I)
            out[n] += w * (b.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.mark.parametrize("tokens", [1, 3, 40])          # gather plan (<= 16 pairs) and grouped plan
def test_matches_the_definition(tokens):
    b = _block()
    x = torch.randn(tokens, H)
    with torch.no_grad():
        torch.testing.assert_close(b(x), _naive(b, x), rtol=1e-5, atol=1e-5)


def test_ties_are_broken_as_the_reference_does():
    # three experts tie for two places: whatever torch.topk picks on the float32 probabilities (the
    # reference's rule), we pick the same, every time
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0, 0.0]] * 3)
    want = torch.topk(torch.softmax(logits, -1, dtype=torch.float32), 2).indices
    for _ in range(3):
        w, ids = route(logits, 2)
        assert torch.equal(ids, want)
        torch.testing.assert_close(w, torch.full((3, 2), 0.5))


def test_router_softmax_is_float32_and_renormalised():
    logits = torch.randn(5, E, dtype=torch.bfloat16)
    w, ids = route(logits, 3)
    assert w.dtype == torch.bfloat16 and ids.shape == (5, 3)
    ref = torch.topk(torch.softmax(logits.float(), -1), 3).values
    torch.testing.assert_close(w, (ref / ref.sum(-1, keepdim=True)).to(torch.bfloat16))


def test_unchosen_experts_are_never_read():
    b = _block()
    x = torch.randn(40, H)
    weights, ids = route(b.gate(x), K)
    with torch.no_grad():
        ids = ids.clamp(max=3)                           # experts 4 and 5 chosen by no token
        expected = b.experts(x, weights, ids)
        b.experts.gate_up_proj[4:] = float("nan")        # any read of them would poison the output
        b.experts.down_proj[4:] = float("nan")
        got = b.experts(x, weights, ids)                 # grouped plan
        few = b.experts(x[:2], weights[:2], ids[:2])     # gather plan
    assert torch.isfinite(got).all() and torch.isfinite(few).all()
    torch.testing.assert_close(got, expected)


def _text(**moe) -> TextConfig:
    return TextConfig(vocab_size=10, hidden_size=H, intermediate_size=32, num_hidden_layers=6,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-6,
                      rope_theta=1e4, mrope_section=(2, 1, 1), mrope_interleaved=True,
                      max_position_embeddings=64, **moe)


@pytest.mark.parametrize("moe,sparse", [
    (dict(num_experts=4, decoder_sparse_step=1), [0, 1, 2, 3, 4, 5]),
    (dict(num_experts=4, decoder_sparse_step=2), [1, 3, 5]),
    (dict(num_experts=4, decoder_sparse_step=3, mlp_only_layers=(5,)), [2]),
    (dict(num_experts=4, decoder_sparse_step=1, mlp_only_layers=(0, 3)), [1, 2, 4, 5]),
    (dict(num_experts=0), []),
])
def test_sparse_layers_follow_the_reference_rule(moe, sparse):
    from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as ref
    cfg = _text(**moe)
    assert [i for i in range(6) if cfg.is_sparse_layer(i)] == sparse
    # the reference's layers, built from its own config class, agree
    ref_cfg = ref.Qwen3VLMoeTextConfig(
        num_hidden_layers=6, hidden_size=H, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, moe_intermediate_size=8, num_experts_per_tok=1, num_experts=moe["num_experts"],
        decoder_sparse_step=moe.get("decoder_sparse_step", 1), mlp_only_layers=list(moe.get("mlp_only_layers", ())))
    ref_sparse = [i for i in range(6)
                  if isinstance(ref.Qwen3VLMoeTextDecoderLayer(ref_cfg, i).mlp, ref.Qwen3VLMoeTextSparseMoeBlock)]
    assert ref_sparse == sparse


def test_model_builds_sparse_blocks_where_the_config_says():
    from qwenvl.models.qwen3_vl.text import DecoderLayer
    cfg = _text(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, decoder_sparse_step=2,
                mlp_only_layers=(3,))
    kinds = [type(DecoderLayer(cfg, i).mlp).__name__ for i in range(6)]
    assert kinds == ["MLP", "SparseMoeBlock", "MLP", "MLP", "MLP", "SparseMoeBlock"]


def test_experts_reject_a_bad_top_k():
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        SparseMoeBlock(H, I, E, E + 1)
    assert isinstance(_block().experts, Experts)
