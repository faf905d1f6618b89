"""The seeded workload and the statistics of bench/vs_llama_server.py, kept pure so tests can pin them.

A workload is a list of requests, each an OpenAI `messages` list (images as PNG data URLs) and a `max_tokens`;
both servers get the same list in the same order. Per request:
  * 1-2 images from a pool of 12 (448x448 up to 1280x720; documents: text lines, a table, a chart; photos:
    smooth colour fields with shapes and noise), drawn with the workload's seed;
  * a question of 10-60 words from a fixed vocabulary (about as many tokens: the words are common English);
  * `max_tokens` drawn from {16, 64, 256}, sent with `ignore_eos` so both sides generate exactly that many;
  * 30% are second turns: an earlier request's images and question again, a fixed assistant answer (the same
    on both sides, whatever each server answered), and a new question.
The client records, per request, when it was sent, when each streamed chunk carrying tokens arrived, and the
usage the server reported; `summarize` turns a phase's records into the numbers of the table.
"""

from __future__ import annotations

import base64
import io
import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

# (width, height): 448x448 up to 1280x720, portrait and landscape
POOL_SIZES = [(448, 448), (640, 480), (480, 640), (800, 600), (1280, 720), (720, 1280),
              (512, 512), (1024, 768), (560, 840), (960, 540), (672, 448), (1280, 720)]
MAX_TOKENS_CHOICES = (16, 64, 256)
SECOND_TURN_SHARE = 0.3
WORDS = ("the what which where how many does image picture document page table chart photo colour text read "
         "describe explain show left right top bottom corner row column number total value first last line "
         "title name date person object background small large red blue green is are in on of and with "
         "a an to from there this that it at for by").split()
ASSISTANT_ANSWER = ("The image shows a page with several lines of text, a small table and a chart; "
                    "the colours are mostly blue and grey.")


@dataclass(frozen=True)
class BenchRequest:
    index: int
    images: tuple[int, ...]            # indices into the image pool, in the order they are shown
    question: str
    max_tokens: int
    earlier: int | None = None         # a second turn: the request whose images and question come first


def document_image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """White page: a title, lines of text, a ruled table and a bar chart, placed by the generator."""
    w, h = size
    img = Image.new("RGB", size, (250, 250, 248))
    d = ImageDraw.Draw(img)
    d.text((w // 20, h // 30), " ".join(rng.choice(WORDS, 4)).title(), fill=(20, 20, 20))
    y = h // 10
    while y < h * 0.45:
        d.text((w // 20, y), " ".join(rng.choice(WORDS, int(rng.integers(5, 12)))), fill=(40, 40, 40))
        y += 14
    x0, y0, rows, cols = w // 20, int(h * 0.5), int(rng.integers(3, 6)), int(rng.integers(2, 5))
    cw, rh = (w * 0.45) / cols, 18
    for r in range(rows + 1):
        d.line([(x0, y0 + r * rh), (x0 + cols * cw, y0 + r * rh)], fill=(0, 0, 0))
    for c in range(cols + 1):
        d.line([(x0 + c * cw, y0), (x0 + c * cw, y0 + rows * rh)], fill=(0, 0, 0))
    for r in range(rows):
        for c in range(cols):
            d.text((x0 + c * cw + 3, y0 + r * rh + 3), str(int(rng.integers(0, 1000))), fill=(0, 0, 0))
    bx, by = int(w * 0.6), int(h * 0.9)
    for i, v in enumerate(rng.integers(10, int(h * 0.35), 6)):
        colour = tuple(int(c) for c in rng.integers(0, 200, 3))
        d.rectangle([bx + i * w // 30, by - int(v), bx + i * w // 30 + w // 40, by], fill=colour)
    return img


def photo_image(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Smooth random colour field, a few filled shapes, pixel noise: photo-like, never two alike."""
    w, h = size
    small = rng.integers(0, 256, (h // 48 + 2, w // 48 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(min(w, h) // 16, min(w, h) // 4))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x - r, y - r, x + r, y + r], fill=colour)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-10, 11, (h, w, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def image_pool(seed: int, sizes: list[tuple[int, int]] = POOL_SIZES) -> list[Image.Image]:
    """len(sizes) images; even indices documents, odd ones photos; the same pixels for the same seed."""
    rng = np.random.default_rng(seed)
    return [(document_image if i % 2 == 0 else photo_image)(rng, s) for i, s in enumerate(sizes)]


def png_data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def make_workload(n: int, seed: int, pool_size: int = len(POOL_SIZES),
                  max_tokens_choices: tuple[int, ...] = MAX_TOKENS_CHOICES) -> list[BenchRequest]:
    """n requests, the same for the same arguments (a private random.Random, nothing global)."""
    rng = random.Random(seed)
    out: list[BenchRequest] = []
    for i in range(n):
        words = rng.randint(10, 60)
        question = " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "?"
        max_tokens = rng.choice(max_tokens_choices)
        firsts = [r for r in out if r.earlier is None]
        if firsts and rng.random() < SECOND_TURN_SHARE:
            before = rng.choice(firsts)
            out.append(BenchRequest(i, before.images, question, max_tokens, earlier=before.index))
        else:
            images = tuple(rng.sample(range(pool_size), rng.choice((1, 2))))
            out.append(BenchRequest(i, images, question, max_tokens))
    return out


def messages(req: BenchRequest, workload: list[BenchRequest], image_urls: list[str]) -> list[dict]:
    """The OpenAI `messages` of a request: images first, then the question; a second turn repeats the
    earlier request's turn and a fixed answer before its own question."""
    first = workload[req.earlier] if req.earlier is not None else req
    user = [{"type": "image_url", "image_url": {"url": image_urls[j]}} for j in first.images]
    user.append({"type": "text", "text": first.question})
    if req.earlier is None:
        return [{"role": "user", "content": user}]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": ASSISTANT_ANSWER},
            {"role": "user", "content": req.question}]


# ------------------------------------------------------------------------- statistics
@dataclass
class Record:
    """One request as the client saw it (times from time.perf_counter())."""
    sent: float
    max_tokens: int
    chunk_times: list[float] = field(default_factory=list)    # arrival of each chunk with tokens
    completion_tokens: int | None = None                      # the server's usage, when it sent one
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_reason is not None and bool(self.chunk_times)

    @property
    def output_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.chunk_times)


def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default);
    NaN for no values."""
    xs = sorted(values)
    if not xs:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(records: list[Record], wall_s: float) -> dict:
    """A phase's numbers: requests/s and output tokens/s over the phase's wall time; TTFT (send to first
    chunk with tokens) and inter-token latency (gaps between consecutive such chunks, vLLM's
    benchmark_serving measure) as p50/p99 in ms; how many requests were answered in full (the length
    asked for, since every request is sent with ignore_eos)."""
    done = [r for r in records if r.ok]
    ttft = [(r.chunk_times[0] - r.sent) * 1e3 for r in done]
    itl = [(b - a) * 1e3 for r in done for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    out_tokens = sum(r.output_tokens for r in done)
    return {
        "requests": len(records),
        "answered": len(done),
        "exact_length": sum(1 for r in done if r.output_tokens == r.max_tokens),
        "errors": sorted({r.error for r in records if r.error})[:3],
        "wall_s": wall_s,
        "req_per_s": len(done) / wall_s if wall_s > 0 else math.nan,
        "out_tok_per_s": out_tokens / wall_s if wall_s > 0 else math.nan,
        "prompt_tokens_mean": (sum(r.prompt_tokens or 0 for r in done) / len(done)) if done else math.nan,
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
        "itl_p50_ms": percentile(itl, 50), "itl_p99_ms": percentile(itl, 99),
    }
