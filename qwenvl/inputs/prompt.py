"""Messages -> everything the engine needs for one prompt: token ids, M-RoPE positions, vision items.

The chat template renders one `<|vision_start|><|image_pad|><|vision_end|>` per image; each pad is expanded
to t*h*w / merge² tokens, one per merged vision embedding. A video (a list of frames, or a file sampled by
video.py) is one pad expanded the same way, except that Qwen3-VL videos become one
`<{time} seconds><|vision_start|>pads<|vision_end|>` group per temporal patch (the Qwen3-VL processor as
released with the model replaces the whole start/pad/end triple; transformers 5.x keeps an extra outer pair).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from ..models.config import ModelConfig
from ..answers.reasoning import prompt_opens_reasoning
from ..structured.tool_prompt import prepare_tool_messages, template_renders_tools
from .errors import InputError
from .images import load_image
from .messages import normalize_messages
from .pdf import expand_documents
from .mrope import VisionSpan, mrope_positions, video_time_interval
from .preprocess import PreprocessorConfig, Processed, preprocess_image, preprocess_sized_frames, preprocess_video
from .video import VideoOptions, read_video

DEFAULT_VIDEO_FPS = 2.0     # frames handed over as a list are taken as sampled at 2 fps (qwen-vl-utils' default)


@dataclass
class VisionItem:
    kind: str                          # "image" | "video"
    pixel_values: torch.Tensor         # [P, C*T*ps*ps] float32, rows in merge-block order
    grid_thw: tuple[int, int, int]     # patch grid before merging
    content_hash: str                  # sha256 hex of the pixels, grid and preprocessing
    token_offset: int                  # index of its first pad token in token_ids
    num_tokens: int                    # t*h*w / merge² pad tokens (Qwen3-VL video: split per frame by
                                       # timestamp text; the pads still come in embedding order)
    original_size: tuple[int, int]     # (w, h) of the image / first frame as loaded
    input_size: tuple[int, int]        # (w, h) after smart_resize: the size the model saw


@dataclass
class PromptInputs:
    token_ids: list[int]
    positions: torch.Tensor            # LongTensor[3, N]
    next_position: int                 # decode step i uses next_position + i on all three rows
    vision: list[VisionItem]
    reasoning_opened: bool = False     # the template left a `<think>` block open: output starts in reasoning


def build_inputs(messages, tokenizer, model_cfg: ModelConfig, pre_cfg: PreprocessorConfig,
                 add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None,
                 tools: list[dict] | None = None) -> PromptInputs:
    """`chat_template_kwargs` (e.g. {"enable_thinking": False}) are passed to the template as variables;
    `tools` (OpenAI shape, already checked) are rendered by the template, or by qwenvl where it cannot."""
    extra = _template_kwargs(chat_template_kwargs)
    conv = expand_documents(normalize_messages(messages), pre_cfg.max_pixels)     # PDF pages become images
    conv = _with_tools(conv, tools, tokenizer, extra)
    media = [p for m in conv for p in m["content"] if isinstance(m["content"], list) and p["type"] in ("image", "video")]
    processed = [_process(p, pre_cfg) for p in media]      # (Processed, original size, frame times | None)
    text = tokenizer.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, **extra)
    ids = tokenizer.encode(text)

    cfg = model_cfg
    pads = [i for i, t in enumerate(ids) if t in (cfg.image_token_id, cfg.video_token_id)]
    if len(pads) != len(media):
        raise InputError(f"the chat template placed {len(pads)} image/video slots for {len(media)} images and "
                         "videos; images are only read from user messages, and text must not contain "
                         "<|image_pad|> or <|video_pad|>")
    merge2 = pre_cfg.merge_size ** 2
    out: list[int] = []
    spans: list[VisionSpan] = []
    items: list[VisionItem] = []
    cursor = 0
    for pad, part, (proc, original, times) in zip(pads, media, processed):
        kind = part["type"]
        want = cfg.image_token_id if kind == "image" else cfg.video_token_id
        if ids[pad] != want:
            raise InputError(f"the chat template put a {'video' if kind == 'image' else 'image'} slot where "
                             f"{kind} number {len(items) + 1} goes")
        t, h, w = proc.grid_thw
        per_frame = h * w // merge2
        if kind == "video" and cfg.video_timestamps:
            # Replace the template's start/pad/end triple by one timestamped group per temporal patch.
            triple = pad > 0 and ids[pad - 1] == cfg.vision_start_token_id and pad + 1 < len(ids) \
                and ids[pad + 1] == cfg.vision_end_token_id
            head, tail = (pad - 1, pad + 2) if triple else (pad, pad + 1)
            out += ids[cursor:head]
            base = len(out)
            first = base + _qwen3_video_tokens(out, times.seconds, proc.grid_thw, tokenizer, cfg, pre_cfg, spans)
            cursor = tail
        else:
            out += ids[cursor:pad]
            first = len(out)
            interval = 1.0
            if kind == "video":
                interval = video_time_interval(cfg.video_time_in_positions, cfg.vision.tokens_per_second,
                                               pre_cfg.temporal_patch_size, times.sample_fps)
            spans.append(VisionSpan(first, proc.grid_thw, interval))
            out += [want] * (t * per_frame)
            cursor = pad + 1
        items.append(VisionItem(
            kind=kind, pixel_values=torch.from_numpy(proc.pixel_values), grid_thw=proc.grid_thw,
            content_hash=_content_hash(kind, proc, pre_cfg, times), token_offset=first, num_tokens=t * per_frame,
            original_size=original, input_size=proc.input_size))
    out += ids[cursor:]
    positions, next_position = mrope_positions(len(out), spans, pre_cfg.merge_size)
    return PromptInputs(token_ids=out, positions=positions, next_position=next_position, vision=items,
                        reasoning_opened=add_generation_prompt and prompt_opens_reasoning(text))


def _with_tools(conv: list[dict], tools: list[dict] | None, tokenizer, extra: dict) -> list[dict]:
    """Tools and tool turns as the template can render them (set into `extra`), or written as text where
    the template knows no tools (Qwen2-VL's)."""
    if not tools and not any(m["role"] == "tool" or m.get("tool_calls") for m in conv):
        return conv
    renders = template_renders_tools(tokenizer.chat_template or "")
    extra["tools"] = (tools or None) if renders else None
    return prepare_tool_messages(conv, tools, renders)


_RESERVED_TEMPLATE_VARS = {"messages", "add_generation_prompt"}


def _template_kwargs(kwargs: dict | None) -> dict:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise InputError("chat_template_kwargs must be an object of named template variables")
    clash = _RESERVED_TEMPLATE_VARS & kwargs.keys()
    if clash:
        raise InputError(f"chat_template_kwargs may not set {sorted(clash)}: they come from the request")
    return dict(kwargs)


def _qwen3_video_tokens(out: list[int], seconds: list[float], grid_thw, tokenizer, cfg: ModelConfig,
                        pre_cfg: PreprocessorConfig, spans: list[VisionSpan]) -> int:
    """Append `<t seconds><|vision_start|>pads<|vision_end|>` per temporal patch to `out`, one t == 1
    M-RoPE span each; return the offset of the first pad from where `out` ended before."""
    start = len(out)
    _, h, w = grid_thw
    per_frame = h * w // pre_cfg.merge_size ** 2
    first = None
    for stamp in _timestamps(seconds, pre_cfg.temporal_patch_size):
        out += tokenizer.encode(f"<{stamp:.1f} seconds>") + [cfg.vision_start_token_id]
        first = len(out) - start if first is None else first
        spans.append(VisionSpan(len(out), (1, h, w)))
        out += [cfg.video_token_id] * per_frame + [cfg.vision_end_token_id]
    return first


@dataclass(frozen=True)
class FrameTimes:
    seconds: list[float]     # time of each sampled frame in the source (Qwen3-VL writes them into the prompt)
    sample_fps: float        # frames per second of the sampled frames (Qwen2.5-VL's second_per_grid_ts)


def _process(part: dict, cfg: PreprocessorConfig) -> tuple[Processed, tuple[int, int], FrameTimes | None]:
    lo, hi = part.get("min_pixels"), part.get("max_pixels")
    if part["type"] == "image":
        image = load_image(part["image"])
        return preprocess_image(image, cfg, lo, hi), image.size, None
    source = part["video"]
    if not isinstance(source, list):
        # A video file: sampled and sized once by the reader, as qwen-vl-utils' fetch_video does.
        video = read_video(source, VideoOptions.from_part(part), cfg.patch_size, cfg.merge_size)
        return (preprocess_sized_frames(video.frames, cfg), video.original_size,
                FrameTimes(video.timestamps(), video.sample_fps))
    # A list of frames is taken as already sampled at `fps` (default 2), frame i at i / fps seconds.
    fps = part.get("fps", DEFAULT_VIDEO_FPS)
    images = [load_image(f) for f in source]
    return (preprocess_video(images, cfg, lo, hi), images[0].size,
            FrameTimes([i / fps for i in range(len(images))], fps))


def _timestamps(seconds: list[float], temporal_patch_size: int) -> list[float]:
    """Qwen3-VL: the time of each temporal patch, the mean of its first and last frame's time."""
    times = seconds + [seconds[-1]] * (-len(seconds) % temporal_patch_size)   # padded frames repeat the last
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def _content_hash(kind: str, proc: Processed, cfg: PreprocessorConfig, times: FrameTimes | None) -> str:
    h = hashlib.sha256()
    h.update(f"{kind}|{proc.grid_thw}|{proc.input_size}|{cfg.patch_size}|{cfg.temporal_patch_size}|"
             f"{cfg.merge_size}|{cfg.image_mean}|{cfg.image_std}|{cfg.rescale_factor}".encode())
    if times is not None:
        # The same frames at another frame rate get other M-RoPE positions (Qwen2.5-VL) or timestamps
        # (Qwen3-VL): the prefix cache must not reuse one's KV for the other.
        h.update(f"|{times.sample_fps!r}|{times.seconds!r}".encode())
    h.update(np.ascontiguousarray(proc.pixel_values, dtype=np.float32).tobytes())
    return h.hexdigest()
