"""The Qwen2 language model as Qwen2-VL and Qwen2.5-VL use it: M-RoPE, GQA, qkv bias, RMSNorm, SwiGLU.

Module names equal the checkpoint keys under `model.language_model.`. Optional q/k RMSNorm and
DeepStack injection let Qwen3-VL reuse the same decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from ...layers.attention import AttentionBackend
from ...layers.norms import RMSNorm
from ...layers import decode_stack, side_by_side
from ...layers.activations import silu_mul
from ...layers.rotary import mrope_cos_sin, rotary_halves, rotate, rotate_heads

QKV, GATE_UP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")


class SelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's channels, before rotary
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def fuse_side_by_side(self) -> int:
        return side_by_side.fuse(self, QKV, "qkv_proj")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        """x[N, D]; cos/sin: the step's rotary half tables (`rotary_halves`)."""
        n, hq, hkv, dh = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = None if self.qk_norm else side_by_side.joined_outputs(self, x, "qkv_proj")
        if qkv is not None:     # q and k side by side: rotated as one tensor (in place with the kernels)
            qk = rotate_heads(qkv, hq + hkv, dh, cos, sin)
            q, k, v = qk[:, :hq], qk[:, hq:], qkv[:, (hq + hkv) * dh:].view(n, hkv, dh)
        else:
            q, k, v = side_by_side.outputs(self, x, QKV, "qkv_proj")
            q, k, v = q.view(n, hq, dh), k.view(n, hkv, dh), v.view(n, hkv, dh)      # [N, H, Dh]
            if self.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = attn.attend(self.layer_idx, q, k, v)                             # [N, Hq, Dh]
        return self.o_proj(out.reshape(n, hq * dh))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def fuse_side_by_side(self) -> int:
        return side_by_side.fuse(self, GATE_UP, "gate_up_proj")

    def decode_mlp(self) -> tuple | None:
        """This MLP for a compiled decode stack (layers/decode_stack.py): its fused products, or None."""
        return decode_stack.dense_mlp(getattr(self, "gate_up_proj", None), self.down_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():                                            # training: autograd needs them
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate_up = side_by_side.joined_outputs(self, x, "gate_up_proj")
        if gate_up is not None:                                                # [N, 2I]: one call at decode
            return self.down_proj(silu_mul(gate_up))
        gate, up = side_by_side.outputs(self, x, GATE_UP, "gate_up_proj")     # [N, I] each: in place below,
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))            # so a long prefill holds two, not four


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = SelfAttention(cfg, layer_idx)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def decode_modules(self) -> list[nn.Module]:
        """The modules a compiled decode stack is made from (decode_spec): while they are the same objects, the
        stack made from them stands."""
        return decode_stack.modules_of(self.input_layernorm, self.post_attention_layernorm, self.self_attn, self.mlp)

    def decode_spec(self) -> decode_stack.DecodeLayerSpec | None:
        """This layer for a compiled decode stack (layers/decode_stack.py), whose C++ makes forward's calls of a
        decode step, or None where a module has no decode form there."""
        a = self.self_attn
        return decode_stack.layer_spec(self.input_layernorm, self.post_attention_layernorm, getattr(a, "qkv_proj", None),
                                       a.o_proj, self.mlp, getattr(a, "q_norm", None), getattr(a, "k_norm", None))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        # the residual add and the second norm in one call where the kernels run (RMSNorm.add_forward)
        x, h = self.post_attention_layernorm.add_forward(x, self.self_attn(self.input_layernorm(x), cos, sin, attn))
        return x + self.mlp(h)


class TextModel(nn.Module):
    """Decoder stack over token embeddings; `forward` takes embeddings so vision rows can be spliced in first."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.hidden_act != "silu":
            raise ValueError(f"text hidden_act {cfg.hidden_act!r} is not supported (only 'silu')")
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.compiled_decode = decode_stack.CompiledDecode()

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend,
                visual_mask: torch.Tensor | None = None, deepstack: list[torch.Tensor] = ()) -> torch.Tensor:
        """x[N, D] embeddings, positions[3, N] -> final-normed hidden[N, D].

        DeepStack (Qwen3-VL): after layer i, deepstack[i][K, D] is added to the K rows under visual_mask.
        """
        c = self.cfg
        cos, sin = rotary_halves(*mrope_cos_sin(positions, c.head_dim, c.rope_theta, c.mrope_section,
                                                c.mrope_interleaved))
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
