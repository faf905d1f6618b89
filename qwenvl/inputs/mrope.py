"""3-row M-RoPE positions (temporal, height, width) for a prompt with vision spans.

Text tokens carry the same position on all three rows, counting on from the previous token. A vision
span of merged grid (t, h, w) starting when the next text position is `p` gets rows
    temporal: p + floor(i_t * time_interval),  height: p + i_h,  width: p + i_w
in raster order (t-major, then h, then w: the order of the merged vision embeddings).
After EVERY span the text resumes at max(all positions so far) + 1. That is the original Qwen rule; transformers
5.x instead adds max(h, w) after a span, which equals it for images (t == 1) and for Qwen3-VL (its videos are
one span per frame) but not for Qwen2/2.5-VL videos whose temporal extent is the longest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VisionSpan:
    offset: int                      # index of the span's first pad token
    grid_thw: tuple[int, int, int]   # patch grid BEFORE spatial merging (what the processor returns)
    time_interval: float = 1.0       # temporal position step per temporal patch (Qwen2.5-VL video: > 1)


def video_time_interval(time_in_positions: bool, tokens_per_second: float, temporal_patch_size: int,
                        fps: float) -> float:
    """A family whose time axis counts real seconds (Qwen2.5-VL) spaces video frames by
    tokens_per_second * seconds per temporal patch; the others by one position per temporal patch."""
    if time_in_positions:
        return tokens_per_second * (temporal_patch_size / fps)
    return 1.0


def mrope_positions(num_tokens: int, spans: list[VisionSpan], merge_size: int) -> tuple[torch.Tensor, int]:
    """Return (positions LongTensor[3, num_tokens], next_position) for decode steps after the prompt."""
    pos = torch.empty(3, num_tokens, dtype=torch.long)
    cursor = 0          # next token index
    nxt = 0             # next text position = max(all positions so far) + 1
    for span in sorted(spans, key=lambda s: s.offset):
        t, h, w = span.grid_thw[0], span.grid_thw[1] // merge_size, span.grid_thw[2] // merge_size
        if span.offset < cursor or span.offset + t * h * w > num_tokens:
            raise ValueError(f"vision span at token {span.offset} (grid {span.grid_thw}) overlaps another "
                             f"span or runs past the {num_tokens} prompt tokens")
        n_text = span.offset - cursor
        pos[:, cursor:span.offset] = torch.arange(nxt, nxt + n_text)
        nxt += n_text
        # Same float32 multiply-then-truncate as the reference, so fractional intervals agree.
        t_idx = (torch.arange(t) * span.time_interval).long()
        grid = torch.stack(torch.meshgrid(t_idx, torch.arange(h), torch.arange(w), indexing="ij"))
        block = grid.reshape(3, -1) + nxt                    # [3, t*h*w]
        pos[:, span.offset:span.offset + t * h * w] = block
        nxt = int(block.max()) + 1
        cursor = span.offset + t * h * w
    pos[:, cursor:] = torch.arange(nxt, nxt + num_tokens - cursor)
    return pos, nxt + num_tokens - cursor
