"""One admission policy for every front end: how much media a request may carry and how large each image
may be, applied in one place (`admit`) so the HTTP APIs and the web demo refuse and resize alike.

Two different limits, kept apart:
  max_image_pixels / max_image_bytes   a decode guard: a file over them is refused before decoding
  pixel_cap(high_resolution)           a resize budget: a larger image is scaled down to fit, not refused
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InputError
from .messages import Conversation, normalize_messages

# DashScope's per-image token caps (its `vl_high_resolution_images` rule)
LOW_RES_TOKENS, HIGH_RES_TOKENS = 1280, 16384


@dataclass(frozen=True)
class AdmissionPolicy:
    max_images: int = 16                      # images per request (a whole conversation's)
    max_video_frames: int = 256               # frames per request over frame lists; frames sampled per video file
    max_image_bytes: int = 20 * 1024 * 1024   # decode guard, per image
    max_image_pixels: int = 8192 * 8192       # decode guard, per image (read from the header)
    max_video_bytes: int = 64 * 1024 * 1024   # per video file or PDF
    pixel_factor: int = 28                    # one vision token covers factor x factor pixels
    default_max_pixels: int | None = None     # the checkpoint's own preprocessor limit

    def pixel_cap(self, high_resolution: bool) -> int:
        """Per-image resize budget: 1,280 vision tokens, or 16,384 with high resolution."""
        return (HIGH_RES_TOKENS if high_resolution else LOW_RES_TOKENS) * self.pixel_factor ** 2

    def default_pixels(self, high_resolution: bool) -> int:
        """The budget of an image that names none: never above the checkpoint's own limit."""
        cap = self.pixel_cap(high_resolution)
        return min(cap, self.default_max_pixels or cap)


@dataclass(frozen=True)
class MediaRef:
    """One image, video file or video frame of an admitted conversation, as the client gave it."""
    message: int
    part: int
    frame: int | None                         # index in a frame list; None for an image or a video file
    kind: str                                 # "image" | "document" (a PDF) | "video_file" | "frame"
    source: object
    where: str                                # the field's path, for error messages


@dataclass
class Admitted:
    conversation: Conversation
    media: list[MediaRef] = field(default_factory=list)

    def with_media(self, loaded: list) -> Conversation:
        """The conversation with each media source replaced by what was loaded for it (same order as
        `media`); new dicts, the admitted conversation stays as it was."""
        conv = Conversation({**m, "content": [_copy(p) for p in m["content"]]} for m in self.conversation)
        for ref, data in zip(self.media, loaded):
            part = conv[ref.message]["content"][ref.part]
            if ref.kind in ("image", "document"):
                part[ref.kind] = data
            elif ref.kind == "video_file":
                part["video"] = data
            else:
                part["video"][ref.frame] = data
        return conv


def _copy(part: dict) -> dict:
    return {**part, "video": list(part["video"])} if isinstance(part.get("video"), list) else dict(part)


def admit(messages, policy: AdmissionPolicy, high_resolution: bool = False, where: str = "") -> Admitted:
    """Normalise once and apply the policy: media counts, each image's pixel budget, video frame caps.
    Raises InputError naming the field; never changes the caller's messages."""
    conv = normalize_messages(list(messages) if isinstance(messages, Conversation) else messages)
    count_media(conv, policy)
    cap, default = policy.pixel_cap(high_resolution), policy.default_pixels(high_resolution)
    out, media = Conversation(), []
    for i, msg in enumerate(conv):
        parts = []
        for j, part in enumerate(msg["content"]):
            at = f"{where}messages[{i}].content[{j}]"
            part = dict(part)
            if part["type"] in ("image", "document"):
                part["max_pixels"] = min(part.get("max_pixels", default), cap)
                if part.get("min_pixels", 0) > part["max_pixels"]:
                    part["min_pixels"] = part["max_pixels"]
                media.append(MediaRef(i, j, None, part["type"], part[part["type"]], at))
            elif part["type"] == "video" and not isinstance(part["video"], list):
                _cap_video_frames(part, policy.max_video_frames, at)
                media.append(MediaRef(i, j, None, "video_file", part["video"], f"{at}.video"))
            elif part["type"] == "video":
                media += [MediaRef(i, j, k, "frame", f, f"{at}.video[{k}]") for k, f in enumerate(part["video"])]
            parts.append(part)
        out.append({**msg, "content": parts})
    return Admitted(out, media)


def count_media(conv: list[dict], policy: AdmissionPolicy) -> None:
    """Images (a document counts once until its pages are rendered; count again after) and frames."""
    images = frames = 0
    for msg in conv:
        for part in msg["content"]:
            if part["type"] in ("image", "document"):
                images += 1
            elif part["type"] == "video" and isinstance(part["video"], list):
                frames += len(part["video"])
    if images > policy.max_images:
        raise InputError(f"too many images: the conversation has {images} images, the limit is "
                         f"{policy.max_images}; send fewer images or start a new conversation")
    if frames > policy.max_video_frames:
        raise InputError(f"too many video frames: {frames} in this request, the limit is "
                         f"{policy.max_video_frames}; sample fewer frames")


def _cap_video_frames(part: dict, limit: int, at: str) -> None:
    """A video file samples at most `limit` frames (qwen-vl-utils allows 768): nframes over it is refused,
    fps sampling is capped through max_frames."""
    if part.get("nframes", 0) > limit:
        raise InputError(f"{at}.nframes: {part['nframes']} frames is over the limit of {limit} frames "
                         "per video")
    if "nframes" not in part:
        part["max_frames"] = min(part.get("max_frames", limit), limit)
