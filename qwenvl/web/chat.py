"""The web chat's logic, free of Gradio: turns -> engine messages -> streamed, annotated replies.

The conversation lives in a list of `Turn`s (one user message with its images and the model's answer),
not in the chatbot's display messages: the model sees the raw answer text (grounding markers included)
and the original images, the user sees a readable answer and the images with boxes drawn.
Everything a user can get wrong (a file that is not an image, one too large, too many images, a
conversation over the context) ends as `Turn.error`, a sentence shown in the chat, never a trace.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from PIL import Image

from ..answers.drawing import draw_boxes
from ..engine.errors import EngineFull, EngineStopped
from ..inputs import AdmissionPolicy, InputError, admit, load_image
from ..inputs.pdf import PdfLimits, render_pdf
from ..answers.readable import readable  # noqa: F401 - web/app.py imports it from here
from ..sampling_params import SamplingParams

log = logging.getLogger("qwenvl.web")

KEEP_ANNOTATED = 256          # newest annotated images kept in out_dir (Gradio serves its own copies)

@dataclass
class Limits:
    """The server's admission policy (the same object the HTTP APIs use) and the model's context."""
    policy: AdmissionPolicy = field(default_factory=AdmissionPolicy)
    max_model_len: int | None = None


@dataclass
class Turn:
    text: str
    images: list[str] = field(default_factory=list)      # paths of the user's uploads (images, videos, PDFs)
    answer: str = ""                                      # raw model text (grounding markers kept)
    annotated: list[str] = field(default_factory=list)   # paths of images with the answer's boxes drawn
    error: str | None = None                              # shown instead of an answer; turn left out of history
    done: bool = False
    reasoning_opened: bool = False                        # the prompt opened a <think> block (Thinking models)


@dataclass(frozen=True)
class Options:
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    high_resolution: bool = False


class ChatError(Exception):
    """A problem the user can fix; its message is shown in the chat."""


VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".m4v")


def upload_kind(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    return "video" if suffix in VIDEO_SUFFIXES else "pdf" if suffix == ".pdf" else "image"


def check_size(path: str, limit: int) -> None:
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
    except OSError:
        raise ChatError(f"{name}: the upload is gone; attach the file again") from None
    if size > limit:
        raise ChatError(f"{name}: the file is {size / 2**20:.1f} MB, over the limit of {limit / 2**20:.0f} MB")


def render_upload_pdf(path: str, limits: Limits, high_resolution: bool) -> list[Image.Image]:
    """A PDF's pages as images, each rendered to the policy's pixel budget (pages count as images)."""
    check_size(path, limits.policy.max_video_bytes)
    try:
        with open(path, "rb") as f:
            return render_pdf(f.read(), os.path.basename(path), limits=PdfLimits(
                max_pages=limits.policy.max_images, max_pixels=limits.policy.default_pixels(high_resolution)))
    except InputError as e:
        raise ChatError(str(e)) from None


def check_image(path: str, limits: Limits) -> Image.Image:
    """Open one uploaded image with the server's size limits; raise ChatError naming the file."""
    name = os.path.basename(path)
    try:
        size = os.path.getsize(path)
    except OSError:
        raise ChatError(f"{name}: the upload is gone; attach the image again") from None
    policy = limits.policy
    if size > policy.max_image_bytes:
        raise ChatError(f"{name}: the file is {size / 2**20:.1f} MB, over the limit of "
                        f"{policy.max_image_bytes / 2**20:.0f} MB; send a smaller image")
    try:
        with Image.open(path) as probe:            # the header only: refuse huge images before decoding
            w, h = probe.size
    except Exception:  # noqa: BLE001 - anything PIL cannot identify is "not an image"
        raise ChatError(f"{name}: not an image we can read (PNG, JPEG, WebP, GIF, BMP, TIFF)") from None
    if w * h > policy.max_image_pixels:
        raise ChatError(f"{name}: the image is {w}x{h} pixels, over the limit of {policy.max_image_pixels:,} "
                        "pixels; send a smaller image")
    try:
        return load_image(path)
    except InputError as e:
        raise ChatError(f"{name}: {str(e).split(': ', 1)[-1]}") from None


def build_messages(turns: list[Turn], limits: Limits, high_resolution: bool) -> tuple[list[dict], list[Image.Image]]:
    """The conversation for the engine (finished turns with answers, then the last turn's question), admitted
    under the server's policy, and the images in the order the engine numbers them (`image_index`)."""
    history = [t for t in turns[:-1] if t.done and t.error is None]
    turns = history + turns[-1:]
    messages, images = [], []
    for i, turn in enumerate(turns):
        content = []
        for path in turn.images:
            kind = upload_kind(path)
            if kind == "video":                    # sampled and sized by inputs/video.py, as on the APIs
                check_size(path, limits.policy.max_video_bytes)
                content.append({"video": path})
                continue
            pages = render_upload_pdf(path, limits, high_resolution) if kind == "pdf" else [check_image(path, limits)]
            images += pages
            content += [{"image": page} for page in pages]
        if turn.text:
            content.append({"text": turn.text})
        messages.append({"role": "user", "content": content})
        if i < len(turns) - 1:
            messages.append({"role": "assistant", "content": turn.answer})
    try:
        return admit(messages, limits.policy, high_resolution).conversation, images
    except InputError as e:
        raise ChatError(str(e)) from None


def annotate(images: list[Image.Image], boxes: list[dict], out_dir: str) -> list[str]:
    """Draw each image's boxes (by `image_index`; -1 = the last image) and save them as PNGs."""
    by_image: dict[int, list[dict]] = {}
    for b in boxes:
        idx = b.get("image_index", -1)
        idx = len(images) - 1 if idx is None or idx < 0 else idx
        if 0 <= idx < len(images):
            by_image.setdefault(idx, []).append(b)
    paths = []
    os.makedirs(out_dir, exist_ok=True)
    for idx in sorted(by_image):
        path = os.path.join(out_dir, f"boxes-{uuid.uuid4().hex[:12]}.png")
        draw_boxes(images[idx], by_image[idx]).save(path)
        paths.append(path)
    _prune(out_dir, KEEP_ANNOTATED)
    return paths


def _prune(out_dir: str, keep: int) -> None:
    try:
        files = sorted((e for e in os.scandir(out_dir) if e.name.startswith("boxes-")),
                       key=lambda e: e.stat().st_mtime, reverse=True)
        for entry in files[keep:]:
            os.unlink(entry.path)
    except OSError:               # another request pruned first; nothing to do
        pass


class ChatSession:
    """Runs the last turn of a conversation on a shared AsyncEngine, streaming into `Turn.answer`."""

    def __init__(self, engine, limits: Limits, out_dir: str | None = None):
        self.engine = engine
        self.limits = limits
        self.out_dir = out_dir or os.path.join(tempfile.gettempdir(), "qwenvl-web")

    async def respond(self, turns: list[Turn], options: Options) -> AsyncIterator[Turn]:
        """Fill in `turns[-1]` as tokens come; yields the turn after each change. Never raises for a user
        error: the turn ends with `error` set instead."""
        turn = turns[-1]
        turn.answer, turn.annotated, turn.error, turn.done = "", [], None, False
        try:
            messages, images = build_messages(turns, self.limits, options.high_resolution)
            try:
                prompt = await self.engine.prepare(messages)
            except InputError as e:
                raise ChatError(str(e)) from None
            turn.reasoning_opened = prompt.reasoning_opened
            params = self._params(options, len(prompt.token_ids))
            final = None
            async for out in self.engine.generate(prompt, params, f"web-{uuid.uuid4().hex[:16]}"):
                if out.text != turn.answer:
                    turn.answer = out.text
                    yield turn
                final = out
            if final is not None and final.error:
                raise ChatError(f"the model stopped early: {final.error}")
            if final is not None and final.boxes:
                turn.annotated = annotate(images, final.boxes, self.out_dir)
        except ChatError as e:
            turn.error = str(e)
        except Exception as e:  # noqa: BLE001 - a full queue, an engine failure: a sentence, the trace to the log
            if isinstance(e, (EngineFull, EngineStopped)):
                turn.error = f"the server is busy ({e}); press Retry in a moment"
            elif isinstance(e, ValueError):            # the engine refused the prompt (too long for the cache)
                turn.error = f"{e}; press Clear to start a shorter conversation"
            else:
                log.exception("web chat request failed")
                turn.error = f"something went wrong on the server ({type(e).__name__}); press Retry"
        turn.done = True
        yield turn

    def _params(self, options: Options, prompt_len: int) -> SamplingParams:
        max_tokens = max(1, int(options.max_tokens))
        limit = self.limits.max_model_len
        if limit is not None:
            room = limit - prompt_len
            if room < 1:
                raise ChatError(f"the conversation is {prompt_len} tokens, the model's context is {limit}; "
                                "press Clear to start a new one, or send fewer or smaller images")
            max_tokens = min(max_tokens, room)
        try:
            return SamplingParams(temperature=float(options.temperature), top_p=float(options.top_p),
                                  max_tokens=max_tokens)
        except ValueError as e:
            raise ChatError(f"bad setting: {e}") from None
