"""Qwen3-VL vision tower: a plain pre-LayerNorm ViT with a learned, resampled position table,
2D rotary attention, a 2x2 patch merger and DeepStack mergers on chosen intermediate blocks.

Rows of `pixel_values` arrive in 2x2 merge-block order (the preprocessor emits them so): for each
frame, block rows, then block columns, then the 2x2 patches inside a block. Everything here that
depends on a patch's (row, col) — the position table and the rotary ids — follows that order, and
the merger can then fuse every 4 consecutive rows into one LLM token.
"""

from __future__ import annotations

import math
from typing import Generator

import torch
import torch.nn.functional as F
from torch import nn

from qwenvl.models.common import run_stages
from qwenvl.models.config import VisionConfig
from qwenvl.layers.attention import segment_attention
from qwenvl.layers.rotary import apply_rotary, vision_cos_sin, vision_patch_coords

# The vision rotary base is not in config.json for any released checkpoint; 10000 is the value
# the reference code uses.
VISION_ROPE_THETA = 10000.0


def activation(name: str):
    """The few activations the Qwen vision towers use, by their config.json names."""
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "silu":
        return F.silu
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    raise ValueError(f"vision hidden_act {name!r} is not supported "
                     f"(expected gelu_pytorch_tanh, gelu, silu or quick_gelu)")


def merge_block_order(h: int, w: int, m: int) -> torch.Tensor:
    """Raster indices (row * w + col) of an h x w grid listed in m x m merge-block order."""
    idx = torch.arange(h * w).view(h // m, m, w // m, m)     # [bh, in_row, bw, in_col]
    return idx.permute(0, 2, 1, 3).reshape(-1)               # [bh, bw, in_row, in_col] flattened


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.shape = (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        # Qwen3-VL's patch conv has a bias (Qwen2/2.5 do not).
        self.proj = nn.Conv3d(cfg.in_channels, cfg.width, kernel_size=self.shape[1:],
                              stride=self.shape[1:], bias=True)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.view(-1, *self.shape).to(self.proj.weight.dtype)   # [P, C, T, ps, ps]
        return self.proj(x).flatten(1)                                      # [P, width]


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.width // cfg.num_heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=True)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cu_seqlens: torch.Tensor) -> torch.Tensor:
        P = x.shape[0]
        q, k, v = self.qkv(x).view(P, 3, self.num_heads, self.head_dim).unbind(1)   # each [P, H, hd]
        # Rotary in float32 even for bf16 weights, as the reference does: the angles of large
        # grids lose too much precision in bf16.
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # Each frame of each image attends only within itself.
        out = segment_attention(q, k, v, cu_seqlens)                                 # [P, H, hd]
        return self.proj(out.reshape(P, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.width, cfg.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.width, bias=True)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, cu_seqlens):
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Fuses each 2x2 block (4 consecutive rows) into one LLM-width token.

    The final merger normalises each patch before the fuse; the DeepStack mergers normalise the
    fused 4*width vector instead (`postshuffle`)."""

    def __init__(self, cfg: VisionConfig, postshuffle: bool):
        super().__init__()
        self.fused = cfg.width * cfg.spatial_merge_size ** 2
        self.postshuffle = postshuffle
        self.norm = nn.LayerNorm(self.fused if postshuffle else cfg.width, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.fused, self.fused, bias=True)
        self.linear_fc2 = nn.Linear(self.fused, cfg.out_hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.postshuffle:
            x = self.norm(x.reshape(-1, self.fused))              # [M, 4*width]
        else:
            x = self.norm(x).reshape(-1, self.fused)              # [P, width] -> [M, 4*width]
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))        # [M, D]


class Qwen3VLVisionModel(nn.Module):
    """`model.visual`: pixel_values[P, C*T*ps*ps] + grid_thw[n, 3] -> (embeds[M, D], deepstack)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.num_position_embeddings <= 0:
            raise ValueError("Qwen3-VL vision_config.num_position_embeddings must be a positive square number")
        side = math.isqrt(cfg.num_position_embeddings)
        if side * side != cfg.num_position_embeddings:
            raise ValueError(f"vision_config.num_position_embeddings={cfg.num_position_embeddings} "
                             f"is not a square number; the position table is a square grid")
        self.cfg = cfg
        self.side = side
        self.merge = cfg.spatial_merge_size
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.width)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, postshuffle=False)
        self.deepstack_visual_indexes = tuple(cfg.deepstack_visual_indexes)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(cfg, postshuffle=True) for _ in self.deepstack_visual_indexes)

    def interpolated_pos_embed(self, grid_thw: list[list[int]]) -> torch.Tensor:
        """The side x side learned table resampled bilinearly (corners aligned) to each h x w grid,
        listed in merge-block order and repeated for every frame -> [P, width] float32."""
        table = self.pos_embed.weight.float().view(self.side, self.side, -1)  # [S, S, width]
        dev, last = table.device, self.side - 1
        out = []
        for t, h, w in grid_thw:
            ys = torch.linspace(0, last, h, device=dev)
            xs = torch.linspace(0, last, w, device=dev)
            y0, x0 = ys.long(), xs.long()                     # floor (non-negative)
            y1, x1 = (y0 + 1).clamp(max=last), (x0 + 1).clamp(max=last)
            dy, dx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
            grid = ((1 - dy) * (1 - dx) * table[y0][:, x0] + (1 - dy) * dx * table[y0][:, x1]
                    + dy * (1 - dx) * table[y1][:, x0] + dy * dx * table[y1][:, x1])   # [h, w, width]
            grid = grid.reshape(h * w, -1)[merge_block_order(h, w, self.merge).to(dev)]
            out.append(grid.repeat(t, 1))                     # same table for every frame
        return torch.cat(out)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return run_stages(self.stages(pixel_values, grid_thw))

    def stages(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
               ) -> Generator[int, None, tuple[torch.Tensor, list[torch.Tensor]]]:
        """forward, paused after each block (yields the P rows it ran); bit for bit the same result."""
        grid = [[int(v) for v in row] for row in grid_thw.tolist()]
        total = sum(t * h * w for t, h, w in grid)
        if pixel_values.shape[0] != total:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows but grid_thw {grid} "
                             f"describes {total} patches")
        x = self.patch_embed(pixel_values)                                    # [P, width]
        x = x + self.interpolated_pos_embed(grid).to(x.dtype)
        coords = vision_patch_coords(grid_thw.cpu(), self.merge).to(x.device)  # [P, 2] (row, col)
        cos, sin = vision_cos_sin(coords, self.cfg.width // self.cfg.num_heads, VISION_ROPE_THETA)
        seqlens = torch.tensor([0] + [h * w for t, h, w in grid for _ in range(t)])  # one segment per frame
        cu_seqlens = seqlens.cumsum(0).to(x.device)
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cu_seqlens)
            if i in self.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[self.deepstack_visual_indexes.index(i)]
                deepstack.append(merger(x))                                   # [M, D]
            yield x.shape[0]
        return self.merger(x), deepstack
