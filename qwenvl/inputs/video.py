"""Read a video file and sample its frames the way qwen-vl-utils' `fetch_video` does, with PyAV.

Sources: a local path, a `file://` URL, a `data:video/...;base64,` URL, or raw bytes (the HTTP server
fetches http(s) URLs itself, with its own limits, and hands the bytes here).

Sampling (qwen-vl-utils 0.0.14, the decord / torchcodec readers; the checkpoints were tuned on it):
- `video_start` / `video_end` (seconds) cut a frame range [first, last] out of the clip;
- the frame count is `nframes` rounded to a multiple of 2, or `fps` (default 2) times the duration,
  clamped to [min_frames (4), max_frames (768)] and to the frames available, floored to a multiple of 2;
- frame indices are `linspace(first, last, n).round()`; the sampled fps is n / frames_in_range * video_fps.
Sizing: every frame is resized once, to smart_resize(h, w) with per-frame pixels between `min_pixels`
(default 128 tokens) and min(`max_pixels`, 768 tokens, `total_pixels` / n * 2), where a token covers
(patch * 2)² pixels. The resize is torchvision's tensor resize (bicubic, antialiased, on float, clamped
and rounded back to 8 bits), written with torch alone.
Only the wanted frames are converted and resized, long gaps between them are skipped by seeking, and
decoding stops after the last one, so a clip never sits in memory whole.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError
from .images import local_source

# qwen-vl-utils' constants (vision_process.py).
DEFAULT_FPS = 2.0
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
VIDEO_MIN_TOKENS = 128               # per-frame pixel floor, in tokens of (patch * merge)² pixels
VIDEO_MAX_TOKENS = 768               # per-frame pixel ceiling
MODEL_SEQ_LEN = 128000               # default total_pixels = MODEL_SEQ_LEN tokens * 0.9
MAX_ASPECT_RATIO = 200
# Refused before decoding: a frame over 8k x 8k (the server's image cap) or under 4 pixels a side.
MAX_FRAME_PIXELS = 8192 * 8192
MIN_SIDE = 4
# Wanted frames further apart than this are reached by seeking to the keyframe before them, not by decoding
# every frame between (long clips at 2 fps skip most of their frames).
SEEK_GAP_FRAMES = 48

OPTION_KEYS = ("fps", "nframes", "min_pixels", "max_pixels", "total_pixels", "min_frames", "max_frames",
               "video_start", "video_end")


@dataclass(frozen=True)
class VideoOptions:
    """The per-video keys of a content item, named and meant as in qwen-vl-utils."""
    fps: float | None = None
    nframes: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    total_pixels: int | None = None
    min_frames: int | None = None
    max_frames: int | None = None
    video_start: float | None = None
    video_end: float | None = None

    @classmethod
    def from_part(cls, part: dict, where: str = "video") -> "VideoOptions":
        """Check the option keys of a content item; raise InputError naming a bad or contradictory one."""
        vals = {}
        for k in ("nframes", "min_pixels", "max_pixels", "total_pixels", "min_frames", "max_frames"):
            if part.get(k) is not None:
                v = part[k]
                if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                    raise InputError(f"{where}: {k} must be a positive integer, got {v!r}")
                vals[k] = v
        for k in ("fps", "video_start", "video_end"):
            if part.get(k) is not None:
                v = part[k]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
                        or (k == "fps" and v == 0):
                    kind = "a positive number" if k == "fps" else "a number of seconds >= 0"
                    raise InputError(f"{where}: {k} must be {kind}, got {v!r}")
                vals[k] = float(v)
        opts = cls(**vals)
        if opts.nframes is not None and opts.fps is not None:
            raise InputError(f"{where}: give either nframes or fps, not both (nframes={opts.nframes}, "
                             f"fps={opts.fps})")
        if opts.nframes is not None and (opts.min_frames is not None or opts.max_frames is not None):
            raise InputError(f"{where}: min_frames/max_frames apply to fps sampling; drop them when giving nframes")
        if opts.min_pixels is not None and opts.max_pixels is not None and opts.max_pixels < opts.min_pixels:
            raise InputError(f"{where}: max_pixels ({opts.max_pixels}) is below min_pixels ({opts.min_pixels})")
        if opts.min_frames is not None and opts.max_frames is not None and opts.max_frames < opts.min_frames:
            raise InputError(f"{where}: max_frames ({opts.max_frames}) is below min_frames ({opts.min_frames})")
        if opts.video_start is not None and opts.video_end is not None and opts.video_end <= opts.video_start:
            raise InputError(f"{where}: video_end ({opts.video_end}) must be after video_start ({opts.video_start})")
        return opts

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in OPTION_KEYS if getattr(self, k) is not None}


@dataclass(frozen=True)
class Video:
    frames: list[np.ndarray]          # uint8 [H, W, 3] each, already at the size the model sees
    frame_indices: list[int]          # index of each frame in the source clip
    video_fps: float                  # the clip's average frame rate
    sample_fps: float                 # frames per second of the sampled frames (qwen-vl-utils' sample_fps)
    original_size: tuple[int, int]    # (w, h) of the source frames
    size: tuple[int, int]             # (w, h) of the returned frames

    def timestamps(self) -> list[float]:
        """Seconds of each returned frame in the source clip (Qwen3-VL writes them into the prompt)."""
        return [i / self.video_fps for i in self.frame_indices]


# ---------------------------------------------------------------------------------------- the rule


def frame_range(total_frames: int, video_fps: float, opts: VideoOptions) -> tuple[int, int]:
    """[first, last] frame indices covered by video_start / video_end (qwen-vl-utils' rounding)."""
    if opts.video_start is None and opts.video_end is None:
        return 0, total_frames - 1
    duration = total_frames / video_fps
    first = 0 if opts.video_start is None else math.ceil(min(opts.video_start, duration) * video_fps)
    last = total_frames - 1
    if opts.video_end is not None:
        last = min(math.floor(min(opts.video_end, duration) * video_fps), total_frames - 1)
    if first >= last:
        raise InputError(f"video_start={opts.video_start} / video_end={opts.video_end} select no frames of a "
                         f"{duration:.2f} s clip ({total_frames} frames at {video_fps:g} fps)")
    return first, last


def count_frames(total_frames: int, video_fps: float, opts: VideoOptions) -> int:
    """How many frames to sample from `total_frames` (qwen-vl-utils' smart_nframes)."""
    if opts.nframes is not None:
        n = round(opts.nframes / FRAME_FACTOR) * FRAME_FACTOR
    else:
        fps = opts.fps if opts.fps is not None else DEFAULT_FPS
        lo = math.ceil((opts.min_frames or FPS_MIN_FRAMES) / FRAME_FACTOR) * FRAME_FACTOR
        hi_raw = opts.max_frames if opts.max_frames is not None else min(FPS_MAX_FRAMES, total_frames)
        hi = math.floor(hi_raw / FRAME_FACTOR) * FRAME_FACTOR
        n = min(min(max(total_frames / video_fps * fps, lo), hi), total_frames)
        n = math.floor(n / FRAME_FACTOR) * FRAME_FACTOR
    if total_frames < FRAME_FACTOR:
        raise InputError(f"the video (or its video_start..video_end range) has {total_frames} frame(s); at least "
                         f"{FRAME_FACTOR} are needed")
    if n > total_frames:
        raise InputError(f"nframes={opts.nframes} asks for more than the {total_frames} frames available")
    if n < FRAME_FACTOR:
        raise InputError(f"nframes={opts.nframes} rounds to {n} frames; ask for at least {FRAME_FACTOR}")
    return n


def frame_indices(first: int, last: int, n: int) -> list[int]:
    # torch's linspace (float32) and round-half-even, exactly as qwen-vl-utils computes them.
    return torch.linspace(first, last, n).round().long().tolist()


def frame_size(height: int, width: int, nframes: int, factor: int, opts: VideoOptions) -> tuple[int, int]:
    """(h, w) every sampled frame is resized to: qwen-vl-utils' per-frame budget, then its smart_resize."""
    min_pixels = opts.min_pixels if opts.min_pixels is not None else VIDEO_MIN_TOKENS * factor * factor
    total = opts.total_pixels if opts.total_pixels is not None else MODEL_SEQ_LEN * factor * factor * 0.9
    max_pixels = max(min(VIDEO_MAX_TOKENS * factor * factor, total / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    if opts.max_pixels is not None:
        max_pixels = min(opts.max_pixels, max_pixels)
    if max_pixels < min_pixels:
        raise InputError(f"video max_pixels ({max_pixels}) is below min_pixels ({min_pixels}); raise max_pixels "
                         "or lower min_pixels")
    return _smart_resize(height, width, factor, min_pixels, max_pixels)


def _smart_resize(height: int, width: int, factor: int, min_pixels: float, max_pixels: float) -> tuple[int, int]:
    """qwen-vl-utils' variant, which differs from the image processor's at the edges: a rounded side is at
    least one factor, and the shrinking branch does not clamp (so it can reach 0, refused here)."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InputError(f"video frames of {width}x{height} have an aspect ratio over {MAX_ASPECT_RATIO}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar <= 0 or w_bar <= 0:
        raise InputError(f"video frames of {width}x{height} shrink to nothing under max_pixels={max_pixels:g}; "
                         "raise max_pixels")
    return h_bar, w_bar


def resize_frame(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [height, width, 3], as torchvision resizes a uint8 tensor (BICUBIC,
    antialias=True): float32 interpolation, clamp to 0..255, round."""
    if frame.shape[:2] == (height, width):
        return frame
    x = torch.from_numpy(frame).permute(2, 0, 1)[None].float()             # [1, 3, H, W]
    y = torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", align_corners=False,
                                        antialias=True)
    y = y.clamp(0, 255).round().to(torch.uint8)
    return np.ascontiguousarray(y[0].permute(1, 2, 0).numpy())


# ---------------------------------------------------------------------------------------- decoding


def read_video(source, opts: VideoOptions | None = None, patch_size: int = 14, merge_size: int = 2) -> Video:
    """Decode the sampled frames of `source`, resized once for a model with this patch and merge size."""
    opts = opts or VideoOptions()
    name = describe(source)
    data = _open_arg(source, name)
    factor = patch_size * merge_size
    try:
        total, video_fps, (w, h) = _probe(data, name)
    except (UnicodeDecodeError, OverflowError, ZeroDivisionError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        # A damaged header PyAV cannot represent (text that is not UTF-8, absurd numbers): the client's file.
        raise InputError(f"{name}: the video header is damaged ({type(e).__name__}); the file may be corrupt") \
            from None
    try:
        first, last = frame_range(total, video_fps, opts)
        n = count_frames(last - first + 1, video_fps, opts)
        out_h, out_w = frame_size(h, w, n, factor, opts)
    except InputError as e:
        raise InputError(f"{name}: {e}") from None
    indices = frame_indices(first, last, n)
    frames = _decode(data, name, indices, out_h, out_w, total, video_fps)
    return Video(frames=frames, frame_indices=indices, video_fps=video_fps,
                 sample_fps=n / (last - first + 1) * video_fps, original_size=(w, h), size=(out_w, out_h))


def _open(data, name: str):
    import av     # here, not at the top: a machine that reads no video (a GPU box training on
                  # stills) may lack PyAV, and images must not need it
    try:
        if isinstance(data, bytes):
            data = io.BytesIO(data)
        # Broken tags must not sink a playable file: ignore undecodable metadata text.
        return av.open(data, mode="r", metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise InputError(f"{name}: not a video file we can read ({_reason(e)}); it may be another kind of file, "
                         "or truncated") from None


def _video_stream(container, name: str):
    if not container.streams.video:
        raise InputError(f"{name}: the file has no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise InputError(f"{name}: the video codec is not supported by this build of FFmpeg")
    return stream


def _probe(data, name: str) -> tuple[int, float, tuple[int, int]]:
    """(frame count, average fps, (w, h)) from the container; frames are counted from packets (no
    decoding) when the header does not say."""
    import av     # lazily: see _open
    with _open(data, name) as container:
        stream = _video_stream(container, name)
        w, h = stream.codec_context.width, stream.codec_context.height
        if w <= 0 or h <= 0:
            raise InputError(f"{name}: the video stream has no frame size")
        if min(w, h) < MIN_SIDE or w * h > MAX_FRAME_PIXELS:
            raise InputError(f"{name}: video frames of {w}x{h} pixels are out of range (each side at least "
                             f"{MIN_SIDE}, at most {MAX_FRAME_PIXELS} pixels a frame)")
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        if not math.isfinite(fps) or fps <= 0:
            raise InputError(f"{name}: the video has no frame rate")
        total = stream.frames
        if total <= 0:
            try:
                total = sum(1 for p in container.demux(stream) if p.size)
            except av.error.FFmpegError as e:
                raise InputError(f"{name}: cannot read the video packets ({_reason(e)}); the file may be "
                                 "truncated or corrupt") from None
        if total <= 0:
            raise InputError(f"{name}: the video has no frames")
    return total, fps, (w, h)


def _decode(data, name: str, indices: list[int], h: int, w: int, total: int, fps: float) -> list[np.ndarray]:
    """The frames at `indices` (in presentation order), each resized as soon as it is decoded.

    Constant-frame-rate streams seek over long gaps (to the keyframe before the next wanted frame) and name
    frames by timestamp, index = round((pts - first pts) * fps); should that miss a frame (odd timestamps),
    the clip is decoded again front to back, counting frames, as the reference readers do."""
    wanted = _decode_seeking(data, name, indices, h, w, fps)
    if wanted is None:
        wanted, seen = _decode_counting(data, name, indices, h, w)
        if indices[-1] not in wanted:
            raise InputError(f"{name}: the video holds {seen} decodable frames, but its header announces {total}; "
                             "the file is truncated or corrupt")
    return [wanted[i] for i in indices]


def _decode_counting(data, name: str, indices: list[int], h: int, w: int) -> tuple[dict, int]:
    import av     # lazily: see _open
    wanted: dict[int, np.ndarray] = {}
    need, last, seen = set(indices), indices[-1], 0
    with _open(data, name) as container:
        stream = _video_stream(container, name)
        stream.thread_type = "AUTO"
        try:
            for i, frame in enumerate(container.decode(stream)):
                seen = i + 1
                if i in need:
                    wanted[i] = resize_frame(frame.to_ndarray(format="rgb24"), h, w)
                if i >= last:
                    break
        except av.error.FFmpegError as e:
            raise InputError(f"{name}: the video does not decode after frame {seen} ({_reason(e)}); the file "
                             "may be truncated or corrupt") from None
    return wanted, seen


def _decode_seeking(data, name: str, indices: list[int], h: int, w: int, fps: float) -> dict | None:
    """None when the stream is not plainly constant-rate or a wanted frame was not met on the way."""
    import av     # lazily: see _open
    wanted: dict[int, np.ndarray] = {}
    with _open(data, name) as container:
        stream = _video_stream(container, name)
        if not stream.average_rate or stream.average_rate != stream.base_rate or not stream.time_base:
            return None
        stream.thread_type = "AUTO"
        tb = float(stream.time_base)
        try:
            frames = container.decode(stream)
            first = next(frames, None)
            if first is None or first.pts is None:
                return None
            pts0, current = first.pts, first
            for target in sorted(set(indices)):
                at = 0 if current is None else round((current.pts - pts0) * tb * fps)
                if target - at > SEEK_GAP_FRAMES:
                    # Aim half a frame early so that rounding cannot put the keyframe search past the target.
                    container.seek(pts0 + int((target - 0.5) / fps / tb), stream=stream, backward=True)
                    frames, current = container.decode(stream), None
                while current is None or round((current.pts - pts0) * tb * fps) < target:
                    current = next(frames, None)
                    if current is None or current.pts is None:
                        return None
                if round((current.pts - pts0) * tb * fps) != target:
                    return None
                wanted[target] = resize_frame(current.to_ndarray(format="rgb24"), h, w)
        except av.error.FFmpegError:
            return None             # the counting pass names the frame where decoding breaks
    return wanted


def _reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or type(e).__name__


# ---------------------------------------------------------------------------------------- sources


def _open_arg(source, name: str):
    """bytes (in memory) or a path string (PyAV reads the file in pieces)."""
    src = local_source(source, name, "video")
    if isinstance(src, bytes):
        if not src:
            raise InputError(f"{name}: empty video data")
        return src
    return str(src)


def describe(source) -> str:
    """A short name for error messages (never a whole base64 payload)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"video bytes ({len(source)} bytes)"
    if isinstance(source, str) and source[:5].lower() == "data:":
        return f"data URL ({source[:30]}...)"
    return str(source)[:200]
