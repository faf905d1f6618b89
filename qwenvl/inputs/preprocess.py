"""Pixels for the vision tower: smart_resize, rescale, normalise, patchify in merge-block order.

Bit-for-bit the pipeline of transformers' PIL `Qwen2VLImageProcessorPil` (the "slow" processor every Qwen-VL
checkpoint was trained with): PIL bicubic resize of the 8-bit RGB image, float64 rescale cast to float32,
float32 normalisation, then one row per ps x ps patch with the temporal axis inside the row.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200


@dataclass(frozen=True)
class PreprocessorConfig:
    """What `preprocessor_config.json` (and `video_preprocessor_config.json`) say about pixels."""
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    # Per-frame budget for videos: the video processor's own defaults (Qwen2-VL: 128*28*28 .. 768*28*28).
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 768 * 28 * 28

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "PreprocessorConfig":
        model_dir = Path(model_dir)
        path = model_dir / "preprocessor_config.json"
        if not path.is_file():
            raise InputError(f"{path}: not found; a checkpoint folder must hold preprocessor_config.json")
        raw = _read_json(path)
        video_path = model_dir / "video_preprocessor_config.json"
        video_raw = _read_json(video_path) if video_path.is_file() else {}
        return cls.from_dict(raw, video_raw)

    @classmethod
    def from_dict(cls, raw: dict, video_raw: dict | None = None) -> "PreprocessorConfig":
        min_px, max_px = _pixel_range(raw, cls.min_pixels, cls.max_pixels)
        patch = int(raw.get("patch_size", 14))
        factor = patch * int(raw.get("merge_size", 2))
        # Without a video file, scale the Qwen2-VL video defaults to this checkpoint's factor (Qwen3: 32).
        vmin, vmax = _pixel_range(video_raw or {}, 128 * factor * factor, 768 * factor * factor)
        return cls(
            min_pixels=min_px, max_pixels=max_px, patch_size=patch,
            temporal_patch_size=int(raw.get("temporal_patch_size", 2)),
            merge_size=int(raw.get("merge_size", 2)),
            image_mean=tuple(float(x) for x in raw.get("image_mean", OPENAI_CLIP_MEAN)),
            image_std=tuple(float(x) for x in raw.get("image_std", OPENAI_CLIP_STD)),
            rescale_factor=float(raw.get("rescale_factor", 1 / 255)),
            do_normalize=bool(raw.get("do_normalize", True)),
            video_min_pixels=vmin, video_max_pixels=vmax,
        )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


def _pixel_range(raw: dict, default_min: int, default_max: int) -> tuple[int, int]:
    # Older files: top-level min_pixels/max_pixels (sometimes also inside `size`); newer ones:
    # size = {shortest_edge, longest_edge}, which for Qwen are pixel COUNTS, not edge lengths.
    # Top-level values win, as transformers' constructor lets them override `size`.
    size = raw.get("size") or {}
    min_px = raw.get("min_pixels", size.get("min_pixels", size.get("shortest_edge", default_min)))
    max_px = raw.get("max_pixels", size.get("max_pixels", size.get("longest_edge", default_max)))
    return int(min_px), int(max_px)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor`, area within [min_pixels, max_pixels], ratio kept.

    Qwen's definition, kept exactly (round, then floor when too big / ceil when too small) because the
    checkpoints were trained on these sizes.
    """
    if min(height, width) <= 0:
        raise InputError(f"image size {width}x{height} is empty")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise InputError(f"absolute aspect ratio must be at most {MAX_ASPECT_RATIO}, got {ratio:.1f} "
                         f"({width}x{height}); crop or pad the image")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class Processed:
    pixel_values: np.ndarray          # [t*h*w, C*T*ps*ps] float32, rows in merge-block order
    grid_thw: tuple[int, int, int]    # patches along time, height, width (before merging)
    input_size: tuple[int, int]       # (w, h) after smart_resize


def preprocess_image(image: Image.Image, cfg: PreprocessorConfig, min_pixels: int | None = None,
                     max_pixels: int | None = None) -> Processed:
    """One RGB image -> patches; a still image is one temporal patch of T identical frames."""
    h, w = _target_size(image, cfg, min_pixels or cfg.min_pixels, max_pixels or cfg.max_pixels)
    frame = _normalize(_resize(image, w, h), cfg)
    return _patchify([frame] * cfg.temporal_patch_size, cfg, w, h)


def preprocess_video(frames: list[Image.Image], cfg: PreprocessorConfig, min_pixels: int | None = None,
                     max_pixels: int | None = None) -> Processed:
    """Frames (already sampled, RGB) -> patches. All frames take the first frame's resized size."""
    if not frames:
        raise InputError("a video needs at least one frame")
    h, w = _target_size(frames[0], cfg, min_pixels or cfg.video_min_pixels,
                        max_pixels or cfg.video_max_pixels)
    arrays = [_normalize(_resize(f, w, h), cfg) for f in frames]
    # The temporal patch needs T frames: pad by repeating the last one (as the reference processors do).
    arrays += [arrays[-1]] * (-len(arrays) % cfg.temporal_patch_size)
    return _patchify(arrays, cfg, w, h)


def preprocess_sized_frames(frames: list[np.ndarray], cfg: PreprocessorConfig) -> Processed:
    """uint8 [H, W, 3] frames already sized by the video reader (inputs/video.py) -> patches, with no second
    resize: the reader's size is the one qwen-vl-utils picks, which the processor's own limits may not keep."""
    if not frames:
        raise InputError("a video needs at least one frame")
    h, w = frames[0].shape[:2]
    if h % cfg.factor or w % cfg.factor or any(f.shape != frames[0].shape for f in frames):
        raise InputError(f"video frames must all share one size that is a multiple of {cfg.factor}, got "
                         f"{sorted({f.shape for f in frames})}")
    arrays = [_normalize(f, cfg) for f in frames]
    arrays += [arrays[-1]] * (-len(arrays) % cfg.temporal_patch_size)
    return _patchify(arrays, cfg, w, h)


def _target_size(image: Image.Image, cfg: PreprocessorConfig, min_pixels: int, max_pixels: int):
    if image.mode != "RGB":
        raise InputError(f"expected an RGB image, got mode {image.mode!r}; load it with load_image()")
    if min_pixels > max_pixels:
        raise InputError(f"min_pixels ({min_pixels}) is larger than max_pixels ({max_pixels})")
    return smart_resize(image.height, image.width, cfg.factor, min_pixels, max_pixels)


def _resize(image: Image.Image, w: int, h: int) -> np.ndarray:
    """uint8 [H, W, 3]; PIL bicubic on 8-bit data, exactly what the PIL processor does."""
    if image.size != (w, h):
        image = image.resize((w, h), resample=Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def _normalize(pixels: np.ndarray, cfg: PreprocessorConfig) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W]; the same float64-then-float32 steps as transformers."""
    x = (pixels.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    if cfg.do_normalize:
        mean = np.asarray(cfg.image_mean, dtype=np.float32)
        std = np.asarray(cfg.image_std, dtype=np.float32)
        x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _patchify(frames: list[np.ndarray], cfg: PreprocessorConfig, w: int, h: int) -> Processed:
    ps, m, tp = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    video = np.stack(frames)                                  # [F, C, H, W]
    f, c = video.shape[:2]
    gt, gh, gw = f // tp, h // ps, w // ps
    x = video.reshape(gt, tp, c, gh // m, m, ps, gw // m, m, ps)
    # -> (gt, gh/m, gw/m, m, m, C, T, ps, ps): one merge block's m*m patches are consecutive rows,
    # and each row holds channel-major, then time, then the ps x ps pixels (the Conv3d weight layout).
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    rows = np.ascontiguousarray(x).reshape(gt * gh * gw, c * tp * ps * ps)
    return Processed(pixel_values=rows, grid_thw=(gt, gh, gw), input_size=(w, h))
