"""Attention backends.

The LM never owns a cache: each decoder layer hands its rotated q/k/v to a backend,
`attn.attend(layer_idx, q[N, Hq, Dh], k[N, Hkv, Dh], v[N, Hkv, Dh]) -> out[N, Hq, Dh]`,
and the backend decides where k/v live. `ContiguousKVCache` is the single-sequence reference backend
(tests, the tiny model, the oracle for the engine's paged backend).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionBackend(Protocol):
    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k/v for `layer_idx` and return causal attention of q over everything stored so far."""
        ...


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q[N, Hq, Dh] are the last N of the L positions in k/v[L, Hkv, Dh]; returns [N, Hq, Dh].

    Query i sits at absolute position L - N + i and sees keys 0..L - N + i. GQA: query head h reads
    kv head h // (Hq / Hkv).
    """
    n, hq, _ = q.shape
    length, hkv, _ = k.shape
    groups = hq // hkv
    qh = q.transpose(0, 1)                                                     # [Hq, N, Dh]
    kh = k.transpose(0, 1).repeat_interleave(groups, dim=0)                    # [Hq, L, Dh]
    vh = v.transpose(0, 1).repeat_interleave(groups, dim=0)
    if n == 1:
        mask = None  # a single new query sees every cached key
    else:
        # SDPA's is_causal aligns the triangle top-left; the new queries sit bottom-right.
        mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril(diagonal=length - n)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)          # [Hq, N, Dh]
    return out.transpose(0, 1)


class ContiguousKVCache:
    """One sequence's k/v, concatenated per layer; new queries sit at the end of the cached keys."""

    def __init__(self, num_layers: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    @property
    def num_tokens(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[0]

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.k[layer_idx] is not None:
            k = torch.cat((self.k[layer_idx], k))                              # [L, Hkv, Dh]
            v = torch.cat((self.v[layer_idx], v))
        self.k[layer_idx], self.v[layer_idx] = k, v
        return causal_attention(q, k, v)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Block-diagonal (non-causal) attention: q/k/v[P, H, Dh]; segment i spans cu_seqlens[i]:cu_seqlens[i+1].

    Used by the ViTs, where each image frame (or each Qwen2.5-VL window) attends only within itself.
    Segments of equal length are batched in one SDPA call, so the many equal windows cost one kernel.
    """
    starts = cu_seqlens[:-1].tolist()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    out = torch.empty_like(q)
    by_length: dict[int, list[int]] = {}
    for s, n in zip(starts, lengths):
        if n > 0:
            by_length.setdefault(n, []).append(s)
    if len(by_length) > MAX_LENGTH_GROUPS and (q.device.type != "cpu" or max(by_length, default=0) <= MAX_PADDED_LEN_CPU):
        return _padded_segment_attention(q, k, v, cu_seqlens, max(by_length))
    for n, seg_starts in by_length.items():
        idx = torch.tensor(seg_starts, device=q.device)[:, None] + torch.arange(n, device=q.device)  # [S, n]
        qs, ks, vs = (t[idx].transpose(1, 2) for t in (q, k, v))              # [S, n, H, Dh] -> [S, H, n, Dh]
        o = F.scaled_dot_product_attention(qs, ks, vs)                         # [S, H, n, Dh]
        out[idx.reshape(-1)] = o.transpose(1, 2).reshape(-1, *q.shape[1:])    # [S*n, H, Dh]
    return out


# Beyond this many distinct segment lengths (a training batch of images of many sizes), one padded SDPA
# call beats a call per length: each call costs index building and, on a GPU, a host-device round trip.
MAX_LENGTH_GROUPS = 4
# On a CPU a call costs microseconds, while padding wastes work quadratic in the length and a masked SDPA
# leaves the flash kernel for the math path (the whole [S, H, L, L] score tensor in float32: over 1 GB for
# 16 images of 448x448 at Qwen2-VL-2B dims). So a CPU pads only segments this short.
MAX_PADDED_LEN_CPU = 256


def _padded_segment_attention(q, k, v, cu_seqlens: torch.Tensor, max_len: int) -> torch.Tensor:
    """segment_attention as one SDPA over segments padded to `max_len`, padding masked out as keys."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    keep = lengths > 0
    starts, lengths = cu_seqlens[:-1][keep], lengths[keep]                     # [S]
    ar = torch.arange(max_len, device=q.device)
    valid = ar[None, :] < lengths[:, None]                                     # [S, L]
    idx = torch.where(valid, starts[:, None] + ar, 0)                          # [S, L]
    qs, ks, vs = (t[idx].transpose(1, 2) for t in (q, k, v))                  # [S, H, L, Dh]
    o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=valid[:, None, None, :])
    out = torch.empty_like(q)
    out[idx[valid]] = o.transpose(1, 2)[valid]                                 # [P, H, Dh]
    return out
