"""The Qwen2.5-VL vision tower: RMSNorm + SwiGLU-with-bias blocks and window attention.

Most blocks attend within windows of `window_size` pixels (window_size / patch / merge merged tokens a
side); the blocks in `fullatt_block_indexes` attend over the whole frame. To make every window a
contiguous run of rows, patches are reordered window by window (keeping each 2x2 merge block together)
before the blocks, and the merged tokens are put back in the original order after the merger.
"""

from __future__ import annotations

from typing import Generator

import torch
import torch.nn.functional as F
from torch import nn

from ..common import run_stages
from ..config import VisionConfig
from ...layers.norms import RMSNorm
from ...layers.rotary import vision_cos_sin, vision_patch_coords
from ..qwen2_vl.vision import PatchEmbed, PatchMerger, VisionAttention, frame_cu_seqlens


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"Qwen2.5-VL vision hidden_act {cfg.hidden_act!r} is not supported (only 'silu')")
        self.gate_proj = nn.Linear(cfg.width, cfg.intermediate_size, bias=True)
        self.up_proj = nn.Linear(cfg.width, cfg.intermediate_size, bias=True)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.width, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.width, 1e-6)
        self.norm2 = RMSNorm(cfg.width, 1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


def window_order(grid_thw: torch.Tensor, merge: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (order[M], cu_window_seqlens[W + 1]) over merged tokens / patches.

    order lists merged-token indices window by window (windows row-major, tokens row-major inside a
    window, edge windows smaller); cu_window_seqlens bounds each window in patches (merge² per token).
    """
    orders, lengths, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        ids = torch.arange(t * gh * gw).view(t, gh, gw)
        for f in range(t):
            for r in range(0, gh, window):
                for c in range(0, gw, window):
                    win = ids[f, r:r + window, c:c + window].reshape(-1)
                    orders.append(win + offset)
                    lengths.append(win.numel() * merge * merge)
        offset += t * gh * gw
    cu = F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
    return torch.cat(orders).to(grid_thw.device), cu.to(grid_thw.device)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, RMSNorm(cfg.width, 1e-6))

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values[P, C*T*ps*ps] (merge-block order), grid_thw[n, 3] -> merged tokens [M, D]."""
        return run_stages(self.stages(pixel_values, grid_thw))

    def stages(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> Generator[int, None, torch.Tensor]:
        """forward, paused after each block (yields the P rows it ran); bit for bit the same result."""
        c = self.cfg
        unit = c.spatial_merge_size ** 2
        grid_thw = grid_thw.to(pixel_values.device)
        window = c.window_size // c.spatial_merge_size // c.patch_size
        order, cu_window = window_order(grid_thw, c.spatial_merge_size, window)
        cu_full = frame_cu_seqlens(grid_thw)

        def to_windows(t: torch.Tensor) -> torch.Tensor:
            # [P, X] -> [M, unit, X], reorder merged tokens, -> [P, X]: merge blocks move as a whole.
            return t.view(-1, unit, t.shape[-1])[order].reshape(t.shape)

        x = to_windows(self.patch_embed(pixel_values))
        coords = vision_patch_coords(grid_thw, c.spatial_merge_size)
        cos, sin = (to_windows(t) for t in vision_cos_sin(coords, c.width // c.num_heads))
        for i, blk in enumerate(self.blocks):
            x = blk(x, cu_full if i in c.fullatt_block_indexes else cu_window, cos, sin)
            yield x.shape[0]
        merged = self.merger(x)                                                # [M, D] in window order
        return merged[torch.argsort(order)]                                    # back to raster order
