"""Qwen3-VL language model (`model.language_model`): a Qwen3 decoder with per-head q/k RMSNorm,
no qkv bias, an explicit head_dim, interleaved M-RoPE, and DeepStack: the vision tower's
intermediate features are added to the hidden states of the first few layers at the visual tokens.

The decoder owns no KV cache: each layer hands its rotated q/k/v to the attention backend
(`attn.attend(layer_idx, q, k, v)`, see docs/internals.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenvl.models.config import TextConfig
from qwenvl.layers.activations import silu_mul
from qwenvl.layers.moe import SparseMoeBlock
from qwenvl.layers.norms import RMSNorm
from qwenvl.layers import decode_stack, side_by_side
from qwenvl.layers.rotary import mrope_cos_sin, rotary_halves, rotate

QKV, GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hq, self.hkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.hq * self.hd, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.hkv * self.hd, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.hkv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.hq * self.hd, cfg.hidden_size, bias=bias)
        # Qwen3: RMSNorm over each head's vector, before rotary.
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)

    def fuse_side_by_side(self) -> int:
        return side_by_side.fuse(self, QKV, "qkv_proj")

    def forward(self, x, cos, sin, attn) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = side_by_side.outputs(self, x, QKV, "qkv_proj")
        q = self.q_norm(q.view(N, self.hq, self.hd))                  # [N, Hq, hd]
        k = self.k_norm(k.view(N, self.hkv, self.hd))                 # [N, Hkv, hd]
        v = v.view(N, self.hkv, self.hd)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)                # cos/sin: rotary half tables
        out = attn.attend(self.layer_idx, q, k, v)                    # [N, Hq, hd]
        return self.o_proj(out.reshape(N, self.hq * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"text hidden_act {cfg.hidden_act!r} is not supported (Qwen3-VL uses silu)")
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def fuse_side_by_side(self) -> int:
        return side_by_side.fuse(self, GATE_UP, "gate_up_proj")

    def decode_mlp(self) -> tuple | None:
        """This MLP for a compiled decode stack (layers/decode_stack.py): its fused products, or None."""
        return decode_stack.dense_mlp(getattr(self, "gate_up_proj", None), self.down_proj)

    def forward(self, x):
        gate_up = None if torch.is_grad_enabled() else side_by_side.joined_outputs(self, x, "gate_up_proj")
        if gate_up is not None:                                   # inference, fused: one call at decode
            return self.down_proj(silu_mul(gate_up))
        gate, up = side_by_side.outputs(self, x, GATE_UP, "gate_up_proj")
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        # Qwen3-VL-MoE: the layers the config marks sparse swap the dense MLP for routed experts.
        self.mlp = SparseMoeBlock(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts,
                                  cfg.num_experts_per_tok) if cfg.is_sparse_layer(layer_idx) else MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def decode_modules(self) -> list[nn.Module]:
        """The modules a compiled decode stack is made from (decode_spec)."""
        return decode_stack.modules_of(self.input_layernorm, self.post_attention_layernorm, self.self_attn, self.mlp)

    def decode_spec(self) -> decode_stack.DecodeLayerSpec | None:
        """This layer for a compiled decode stack (layers/decode_stack.py), or None where a module has no decode
        form there."""
        a = self.self_attn
        return decode_stack.layer_spec(self.input_layernorm, self.post_attention_layernorm,
                                       getattr(a, "qkv_proj", None), a.o_proj, self.mlp, a.q_norm, a.k_norm)

    def forward(self, x, cos, sin, attn):
        # the residual add and the second norm in one call where the kernels run (RMSNorm.add_forward)
        x, h = self.post_attention_layernorm.add_forward(x, self.self_attn(self.input_layernorm(x), cos, sin, attn))
        return x + self.mlp(h)


class Qwen3VLTextModel(nn.Module):
    """`model.language_model`: embeddings in, final-normed hidden states out."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.head_dim // 2 != sum(cfg.mrope_section):
            raise ValueError(f"mrope_section {cfg.mrope_section} must sum to head_dim/2 = {cfg.head_dim // 2}")
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cfg = cfg
        self.compiled_decode = decode_stack.CompiledDecode()

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn,
                visual_mask: torch.Tensor | None, deepstack: list[torch.Tensor]) -> torch.Tensor:
        """x[N, D] input embeddings; positions[3, N]; deepstack[i][K, D] is added after layer i
        to the K rows where visual_mask[N] is set."""
        c = self.cfg
        # Interleaved for Qwen3-VL: every axis gets both high and low frequencies.
        cos, sin = rotary_halves(*mrope_cos_sin(positions, c.head_dim, c.rope_theta, c.mrope_section,
                                                c.mrope_interleaved))          # [N, 1, hd/2] float32
        if not deepstack:   # a decode step in one compiled call where it can (layers/decode_stack.py)
            out = self.compiled_decode.run(self.layers, x, cos, sin, attn, c.num_attention_heads,
                                           c.num_key_value_heads, c.head_dim)
            if out is not None:
                return self.norm(out)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attn)
            if i < len(deepstack):
                x = x.index_put((visual_mask,), x[visual_mask] + deepstack[i].to(x.dtype))
        return self.norm(x)
