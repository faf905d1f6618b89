"""OpenAI and DashScope message shapes -> one canonical conversation.

Canonical: {"role", "content": [part, ...]} with parts
  {"type": "text", "text": str}
  {"type": "image", "image": source, "min_pixels"?: int, "max_pixels"?: int}
  {"type": "document", "document": PDF source, "pages"?: "1-3,5", "max_pixels"?: int}   (pages become images)
  {"type": "video", "video": [frame sources] | file source, "fps"?: float, "min_pixels"?, "max_pixels"?,
   "nframes"?, "total_pixels"?, "min_frames"?, "max_frames"?, "video_start"?, "video_end"?}
Image and video sources are left as given (URL, path, PIL image, bytes); loading happens when the prompt is
built. A video file (path, file://, data:video/..., bytes) is sampled by inputs/video.py.
Other message fields (tool_calls, name, ...) pass through untouched.
"""

from __future__ import annotations

from pathlib import PurePath

from .errors import InputError
from .pdf import is_pdf_source
from .video import OPTION_KEYS, VideoOptions

ROLES = ("system", "user", "assistant", "tool")
_PIXEL_KEYS = ("min_pixels", "max_pixels")


class Conversation(list):
    """A conversation already in the canonical shape (inputs.admit made it): normalize_messages keeps it."""


def normalize_messages(messages) -> list[dict]:
    """Return the conversation in the canonical shape; raise InputError naming the bad message and field."""
    if isinstance(messages, Conversation):
        return messages
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages must be a non-empty list of {'role', 'content'} objects")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InputError(f"{where}: must be an object with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise InputError(f"{where}.role: {role!r} is not a known role; use one of {', '.join(ROLES)}")
        for key in ("tool_call_id", "name"):       # strings where given (the API documents them so)
            if msg.get(key) is not None and not isinstance(msg[key], str):
                raise InputError(f"{where}.{key}: must be a string, got {type(msg[key]).__name__}")
        content = msg.get("content")
        if content is None:
            parts = []     # an assistant turn that only holds tool_calls
        elif isinstance(content, str):
            parts = [{"type": "text", "text": _unicode_text(content, f"{where}.content")}]
        elif isinstance(content, dict):
            parts = [_part(content, f"{where}.content")]     # one part given bare
        elif isinstance(content, (list, tuple)):
            parts = [_part(p, f"{where}.content[{j}]") for j, p in enumerate(content)]
        else:
            raise InputError(f"{where}.content: must be a string or a list of parts, got {type(content).__name__}")
        if role != "user" and role != "tool" and any(p["type"] != "text" for p in parts):
            raise InputError(f"{where}.content: images and videos are only accepted in user messages, "
                             f"not in a {role} message")
        out.append({**msg, "content": parts})
    return out


def _unicode_text(text: str, where: str) -> str:
    """JSON may carry an unpaired surrogate ("\\ud800"), which no tokenizer can encode: name the field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{where}: not valid Unicode text (an unpaired surrogate at character {e.start})") from None
    return text


def _part(part, where: str) -> dict:
    if isinstance(part, str):
        return {"type": "text", "text": _unicode_text(part, where)}
    if not isinstance(part, dict):
        raise InputError(f"{where}: a content part must be an object, got {type(part).__name__}")
    kind = part.get("type")
    if kind in ("text", "input_text") or (kind is None and "text" in part):
        text = part.get("text")
        if not isinstance(text, str):
            raise InputError(f"{where}.text: must be a string, got {type(text).__name__}")
        return {"type": "text", "text": _unicode_text(text, f"{where}.text")}
    if kind == "image_url" or (kind is None and "image_url" in part):
        return _image(part, part.get("image_url"), f"{where}.image_url", nested=True)
    if kind == "image" or (kind is None and "image" in part):
        return _image(part, part.get("image"), f"{where}.image", nested=False)
    if kind == "video_url" or (kind is None and "video_url" in part):
        return _video(part, part.get("video_url"), f"{where}.video_url")
    if kind == "video" or (kind is None and "video" in part):
        return _video(part, part.get("video"), f"{where}.video")
    if kind is not None:
        raise InputError(f"{where}.type: unknown part type {kind!r}; use text, image_url, image or video")
    raise InputError(f"{where}: part has no known key (text, image, image_url, video); got keys "
                     f"{sorted(map(str, part))}")


def _image(part: dict, value, where: str, nested: bool) -> dict:
    extra = {}
    if nested and isinstance(value, dict):
        # OpenAI: {"image_url": {"url": ..., "detail": ...}}; pixel limits may sit beside the url.
        extra = {k: value[k] for k in _PIXEL_KEYS if k in value}
        if "url" not in value:
            raise InputError(f"{where}.url: missing; expected {{'url': 'data:image/...' | 'https://...'}}")
        value, where = value["url"], f"{where}.url"
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InputError(f"{where}: empty image source; give a URL, path or data: URL")
    if is_pdf_source(value):
        # A PDF where an image goes: its pages become images (inputs/pdf.py), `pages` picks them.
        out = {"type": "document", "document": value}
        if part.get("pages") is not None:
            out["pages"] = part["pages"]
    else:
        out = {"type": "image", "image": value}
    out.update(_pixels({**extra, **{k: part[k] for k in _PIXEL_KEYS if k in part}}, where))
    return out


def _video(part: dict, value, where: str) -> dict:
    if isinstance(value, dict):
        # OpenAI: {"video_url": {"url": ...}}; sampling options may sit beside the url.
        if "url" not in value:
            raise InputError(f"{where}.url: missing; expected {{'url': 'data:video/...' | 'https://...'}}")
        part = {**{k: value[k] for k in OPTION_KEYS if k in value}, **part}
        value, where = value["url"], f"{where}.url"
    if value is None or (isinstance(value, (str, bytes, list, tuple)) and len(value) == 0):
        raise InputError(f"{where}: empty video; give a video file (path, file:// or data: URL) or a list of "
                         "frames (image sources)")
    if isinstance(value, PurePath):
        value = str(value)
    if not isinstance(value, (str, bytes, list, tuple)):
        raise InputError(f"{where}: must be a video URL or path, video bytes, or a list of frame sources, got "
                         f"{type(value).__name__}")
    out = {"type": "video", "video": list(value) if isinstance(value, tuple) else value}
    # qwen-vl-utils' option keys (fps, nframes, min/max/total_pixels, min/max_frames, video_start/end),
    # checked together so that contradictions (nframes with fps, max below min) are named here.
    out.update(VideoOptions.from_part(part, where).as_dict())
    return out


def _pixels(values: dict, where: str) -> dict:
    for k, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise InputError(f"{where}: {k} must be a positive integer (a pixel count), got {v!r}")
    if "min_pixels" in values and "max_pixels" in values and values["min_pixels"] > values["max_pixels"]:
        raise InputError(f"{where}: min_pixels ({values['min_pixels']}) is larger than max_pixels "
                         f"({values['max_pixels']})")
    return values
