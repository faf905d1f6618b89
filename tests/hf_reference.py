"""Reference inputs for parity tests, made with transformers' own image processor, tokenizer and get_rope_index.

transformers' full processor needs torchvision (absent here), so the few lines it adds on top of the
image processor and tokenizer are done here: expand each pad token to its grid's token count, mark the
modality of every token, and patchify video frames in pairs as the video processor would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class RefInputs:
    input_ids: torch.Tensor          # [1, N]
    mm_token_type_ids: torch.Tensor  # [1, N]: 0 text, 1 image, 2 video
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    pixel_values_videos: torch.Tensor | None
    video_grid_thw: torch.Tensor | None

    def hf_kwargs(self) -> dict:
        return {k: v for k, v in vars(self).items() if v is not None}


def _video_patches(image_processor, frames) -> tuple[torch.Tensor, torch.Tensor]:
    """frames (even count, same size) -> (pixel_values_videos[P, C*2*ps*ps], grid_thw[1, 3])."""
    per = [image_processor(images=[f], return_tensors="pt") for f in frames]
    grid = per[0]["image_grid_thw"][0]
    c, ps = 3, image_processor.patch_size
    # The image processor repeats a still image over the temporal patch; keep one copy of each frame.
    single = [p["pixel_values"].view(-1, c, 2, ps, ps)[:, :, 0] for p in per]  # [gh*gw, C, ps, ps] each
    groups = [torch.stack((single[i], single[i + 1]), dim=2) for i in range(0, len(single), 2)]
    pixels = torch.cat(groups).reshape(-1, c * 2 * ps * ps)
    return pixels, torch.tensor([[len(groups), int(grid[1]), int(grid[2])]])


def build_ref_inputs(model_dir: str | Path, images=(), video_frames=None,
                     question: str = "Describe this image.", video_timestamps: list[float] | None = None) -> RefInputs:
    """`video_timestamps` (Qwen3-VL): seconds of each temporal patch; the video's start/pad/end triple becomes
    one `<t seconds><|vision_start|>pads<|vision_end|>` group per temporal patch, as the released processor
    writes it."""
    from transformers import AutoImageProcessor, AutoTokenizer
    ip = AutoImageProcessor.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    content = [{"type": "image"} for _ in images]
    if video_frames is not None:
        content.append({"type": "video"})
    content.append({"type": "text", "text": question})
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                   tokenize=False)
    merge2 = ip.merge_size ** 2
    pixel_values = image_grid = video_pixels = video_grid = None
    if images:
        out = ip(images=list(images), return_tensors="pt")
        pixel_values, image_grid = out["pixel_values"], out["image_grid_thw"]
        for thw in image_grid:
            text = text.replace("<|image_pad|>", "<|placeholder|>" * int(thw.prod() // merge2), 1)
        text = text.replace("<|placeholder|>", "<|image_pad|>")
    if video_frames is not None:
        video_pixels, video_grid = _video_patches(ip, video_frames)
        if video_timestamps is None:
            text = text.replace("<|video_pad|>", "<|video_pad|>" * int(video_grid[0].prod() // merge2), 1)
        else:
            t, h, w = video_grid[0].tolist()
            assert len(video_timestamps) == t
            groups = "".join(f"<{s:.1f} seconds><|vision_start|>" + "<|video_pad|>" * (h * w // merge2)
                             + "<|vision_end|>" for s in video_timestamps)
            text = text.replace("<|vision_start|><|video_pad|><|vision_end|>", groups, 1)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    types = torch.zeros_like(ids)
    types[ids == tok.convert_tokens_to_ids("<|image_pad|>")] = 1
    types[ids == tok.convert_tokens_to_ids("<|video_pad|>")] = 2
    return RefInputs(ids, types, pixel_values, image_grid, video_pixels, video_grid)
