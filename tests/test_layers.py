"""The shared layers against plain references: KV cache, segment attention, rotary layouts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwenvl.layers.attention import ContiguousKVCache, causal_attention, segment_attention
from qwenvl.layers.rotary import mrope_cos_sin, mrope_frequency_axis, vision_patch_coords


def _naive_causal(q, k, v):
    hq, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("nhd,lhd->hnl", q, k) / q.shape[-1] ** 0.5
    n, length = q.shape[0], k.shape[0]
    allowed = torch.arange(length)[None, :] <= (torch.arange(n)[:, None] + length - n)
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hnl,lhd->nhd", s.softmax(-1), v)


def test_chunked_prefill_and_decode_match_one_full_pass():
    torch.manual_seed(0)
    q, k, v = torch.randn(11, 4, 8), torch.randn(11, 2, 8), torch.randn(11, 2, 8)
    full = causal_attention(q, k, v)
    torch.testing.assert_close(full, _naive_causal(q, k, v), atol=1e-5, rtol=1e-5)
    cache = ContiguousKVCache(num_layers=2)
    parts = []
    for a, b in ((0, 5), (5, 9), (9, 10), (10, 11)):  # two prefill chunks, then two decode steps
        parts.append(cache.attend(1, q[a:b], k[a:b], v[a:b]))
    torch.testing.assert_close(torch.cat(parts), full, atol=1e-5, rtol=1e-5)
    assert cache.k[0] is None and cache.k[1].shape == (11, 2, 8)


def test_segment_attention_is_block_diagonal():
    torch.manual_seed(0)
    q, k, v = (torch.randn(20, 2, 8) for _ in range(3))
    cu = torch.tensor([0, 4, 8, 15, 20], dtype=torch.int32)  # two equal segments share one SDPA call
    out = segment_attention(q, k, v, cu)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
        torch.testing.assert_close(out[a:b], ref, atol=1e-6, rtol=1e-6)


def _hf_text_rotary(cls, section, interleaved, positions):
    from types import SimpleNamespace
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(section)}
    if interleaved:
        rope["mrope_interleaved"] = True
    cfg = SimpleNamespace(max_position_embeddings=64, rope_parameters=rope, head_dim=2 * sum(section),
                          hidden_size=64, num_attention_heads=4)
    return cls(cfg)(torch.zeros(1), positions[:, None, :])


def test_mrope_matches_transformers_in_both_layouts():
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding
    positions = torch.stack([torch.arange(9), torch.arange(9) * 2 + 1, torch.arange(9) * 3 + 2])
    for cls, section, inter in ((Qwen2VLRotaryEmbedding, (2, 3, 3), False),
                                (Qwen3VLTextRotaryEmbedding, (4, 2, 2), True)):
        cos_ref, sin_ref = _hf_text_rotary(cls, section, inter, positions)
        cos, sin = mrope_cos_sin(positions, 2 * sum(section), 10000.0, section, inter)
        torch.testing.assert_close(cos, cos_ref[0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(sin, sin_ref[0], atol=1e-6, rtol=1e-6)


def test_mrope_tables_are_kept_per_layout_and_equal_a_fresh_computation():
    """mrope_cos_sin keeps its constant tables between calls (a decode step asks every time): a second call,
    and calls for another layout or theta in between, give the bytes of the plain formula."""
    from qwenvl.layers.rotary import inverse_frequencies
    positions = torch.stack([torch.arange(5) + 7, torch.arange(5) * 2, torch.arange(5) * 3 + 1])

    def plain(section, interleaved, theta):
        freqs = positions[..., None].float() * inverse_frequencies(2 * sum(section), theta)
        axis = mrope_frequency_axis(section, interleaved)
        freqs = freqs.gather(0, axis.view(1, 1, -1).expand(1, freqs.shape[1], -1))[0]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()

    for _ in range(2):
        for section, interleaved, theta in (((2, 3, 3), False, 1e4), ((4, 2, 2), True, 1e4), ((2, 3, 3), False, 1e6)):
            cos, sin = mrope_cos_sin(positions, 2 * sum(section), theta, list(section), interleaved)
            cos_want, sin_want = plain(section, interleaved, theta)
            assert torch.equal(cos, cos_want) and torch.equal(sin, sin_want)


def test_interleaved_axis_layout():
    assert mrope_frequency_axis((4, 2, 2), True).tolist() == [0, 1, 2, 0, 1, 2, 0, 0]
    assert mrope_frequency_axis((2, 3, 3), False).tolist() == [0, 0, 1, 1, 1, 2, 2, 2]


def test_vision_coords_in_merge_block_order():
    coords = vision_patch_coords(torch.tensor([[2, 2, 4]]), merge=2)
    first_frame = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    assert [tuple(c) for c in coords.tolist()] == first_frame * 2


def test_padded_segment_attention_matches_per_length_groups(monkeypatch):
    """Many distinct image sizes take the one-call padded path; it must equal the grouped path."""
    from qwenvl.layers import attention
    torch.manual_seed(0)
    lengths = [5, 7, 9, 3, 11, 2, 6, 8, 0, 4]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    q, k, v = (torch.randn(sum(lengths), 4, 16) for _ in range(3))
    padded = attention.segment_attention(q, k, v, cu)            # 9 distinct lengths > MAX_LENGTH_GROUPS
    monkeypatch.setattr(attention, "MAX_LENGTH_GROUPS", 100)
    grouped = attention.segment_attention(q, k, v, cu)
    assert (padded - grouped).abs().max() < 1e-5
