"""The Qwen2-VL vision tower: Conv3d patch embedding, 2D rotary, LayerNorm ViT blocks, 2x2 patch merger.

Module names equal the checkpoint keys under `model.visual.`. The patch embedding, attention and merger
here are reused by Qwen2.5-VL's tower, which swaps the norms and the MLP and adds window attention.
"""

from __future__ import annotations

from typing import Generator

import torch
import torch.nn.functional as F
from torch import nn

from ..common import run_stages
from ..config import VisionConfig
from ...layers.attention import segment_attention
from ...layers.norms import layer_norm
from ...layers.rotary import apply_rotary, vision_cos_sin, vision_patch_coords


class PatchEmbed(nn.Module):
    """A Conv3d whose stride equals its kernel is a matmul over each flattened patch; we run it as one."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.width, kernel_size=k, stride=k, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight                                                   # [width, C, T, ps, ps]
        # pixel rows are flattened in (C, T, ps, ps) order, the same order as the kernel's.
        return F.linear(pixels.to(w.dtype), w.reshape(w.shape[0], -1))        # [P, width]


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=True)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=True)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        p = x.shape[0]
        q, k, v = self.qkv(x).view(p, 3, self.num_heads, -1).unbind(1)       # 3 x [P, H, Dh]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)           # one at a time: float32 temporaries
        out = segment_attention(q, k, v, cu_seqlens)                           # [P, H, Dh]
        return self.proj(out.reshape(p, -1))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled():                        # training: autograd needs the intermediates
        return x * torch.sigmoid(1.702 * x)
    return (x * 1.702).sigmoid_().mul_(x)              # inference: one temporary, not three


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.hidden_act != "quick_gelu":
            raise ValueError(f"Qwen2-VL vision hidden_act {cfg.hidden_act!r} is not supported (only 'quick_gelu')")
        self.fc1 = nn.Linear(cfg.width, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = layer_norm(cfg.width)
        self.norm2 = layer_norm(cfg.width)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Concatenates each merge x merge block of patches (adjacent rows) and projects to the LLM width."""

    def __init__(self, cfg: VisionConfig, norm: nn.Module) -> None:
        super().__init__()
        self.merged_dim = cfg.width * cfg.spatial_merge_size ** 2
        self.ln_q = norm
        self.mlp = nn.Sequential(
            nn.Linear(self.merged_dim, self.merged_dim), nn.GELU(), nn.Linear(self.merged_dim, cfg.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.merged_dim))               # [P, width] -> [M, merge²*width] -> [M, D]


def frame_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """[frames + 1] int32 boundaries: every frame of every image/video attends only within itself."""
    per_frame = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return F.pad(per_frame.cumsum(0), (1, 0)).to(torch.int32)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, layer_norm(cfg.width))

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values[P, C*T*ps*ps] (merge-block order), grid_thw[n, 3] -> merged tokens [M, D]."""
        return run_stages(self.stages(pixel_values, grid_thw))

    def stages(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> Generator[int, None, torch.Tensor]:
        """forward, paused after each block (yields the P rows it ran): the engine spreads a tower run over
        several steps. The same operations in the same order, so the result is forward's, bit for bit."""
        grid_thw = grid_thw.to(pixel_values.device)
        x = self.patch_embed(pixel_values)
        coords = vision_patch_coords(grid_thw, self.cfg.spatial_merge_size)
        cos, sin = vision_cos_sin(coords, self.cfg.width // self.cfg.num_heads)
        cu = frame_cu_seqlens(grid_thw)
        for blk in self.blocks:
            x = blk(x, cu, cos, sin)
            yield x.shape[0]
        return self.merger(x)

