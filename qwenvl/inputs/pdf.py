"""PDF documents -> one RGB image per page, in page order (issue 26 part 2), rendered with pypdfium2.

Pure functions on bytes: the caller (messages, CLI, server) reads the file or data URL and passes the
model's `max_pixels`, so each page is rendered once at a scale that fits it and smart_resize only snaps it
to the patch grid. The page count is checked against `PdfLimits.max_pages` before anything is rendered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pathlib import PurePath

from PIL import Image

from .errors import InputError
from .images import read_source


class PdfError(InputError):
    """A PDF we cannot or will not render (corrupt, encrypted, too many pages, bad page range)."""


@dataclass(frozen=True)
class PdfLimits:
    max_pages: int = 32              # pages rendered per document; more is refused before rendering
    max_pixels: int = 28 * 28 * 1280  # per page; the model's image max_pixels


def is_pdf(data: bytes) -> bool:
    return data[:1024].lstrip().startswith(b"%PDF-")


def is_pdf_source(source) -> bool:
    """A PDF where an image may go: a data:application/pdf URL, a path or URL ending in .pdf, or PDF bytes."""
    if isinstance(source, (bytes, bytearray)):
        return is_pdf(bytes(source[:1024]))
    if isinstance(source, PurePath):
        source = str(source)
    if not isinstance(source, str):
        return False
    head = source[:40].lower()
    if head.startswith("data:"):
        return head.startswith("data:application/pdf")
    return source.split("?", 1)[0].split("#", 1)[0].lower().endswith(".pdf")


def expand_documents(conv: list[dict], max_pixels: int, max_pages: int = PdfLimits.max_pages) -> list[dict]:
    """The conversation with every document part replaced by its chosen pages as image parts, in page order
    (a new list; parts without documents are kept as they are). Each page is rendered to fit the part's
    max_pixels (else `max_pixels`); sources are local (path, file://, data: URL) or the fetched bytes."""
    if not any(p["type"] == "document" for m in conv for p in m["content"]):
        return conv
    out = type(conv)() if isinstance(conv, list) else []
    for m in conv:
        parts = []
        for p in m["content"]:
            if p["type"] != "document":
                parts.append(p)
                continue
            name = _name(p["document"])
            budget = p.get("max_pixels", max_pixels)
            pages = render_pdf(read_source(p["document"], name, media="pdf"), name, p.get("pages"),
                               PdfLimits(max_pages=max_pages, max_pixels=budget))
            parts += [{"type": "image", "image": page, "max_pixels": budget} for page in pages]
        out.append({**m, "content": parts})
    return out


def _name(source) -> str:
    if isinstance(source, (bytes, bytearray)):
        return f"PDF bytes ({len(source)} bytes)"
    return f"data URL ({source[:30]}...)" if str(source)[:5].lower() == "data:" else str(source)


def parse_pages(spec: str | int | list[int] | None, n_pages: int) -> list[int]:
    """`"1-3,5"`, `3`, `[1, 2]` or None (all) -> 0-based page indices; 1-based, inclusive, as users write them."""
    if spec is None:
        return list(range(n_pages))
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = str(spec)
    parts = [str(p) for p in spec] if isinstance(spec, list) else str(spec).split(",")
    pages: list[int] = []
    for part in (p.strip() for p in parts):
        first, _, last = part.partition("-")
        if not (first.isdigit() and (not last or last.isdigit())):
            raise PdfError(f"pages {spec!r}: write page numbers like '1-3,5' (1-based)")
        lo, hi = int(first), int(last or first)
        if lo > hi:
            raise PdfError(f"pages {spec!r}: '{part}' is a reversed range; write the first page first, '{hi}-{lo}'")
        if not 1 <= lo <= hi <= n_pages:
            raise PdfError(f"pages {spec!r}: the document has {n_pages} page(s); '{part}' is outside 1-{n_pages}")
        pages.extend(range(lo - 1, hi))
    return pages


def render_pdf(data: bytes, name: str, pages=None, limits: PdfLimits = PdfLimits()) -> list[Image.Image]:
    """Render the chosen pages of the PDF `data` (named `name` in errors) as RGB images, page order."""
    import pypdfium2 as pdfium
    if not is_pdf(data):
        raise PdfError(f"{name}: not a PDF (no %PDF- header)")
    try:
        doc = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as e:
        hint = " (it is password-protected; decrypt it first)" if "password" in str(e).lower() else ""
        raise PdfError(f"{name}: cannot open the PDF{hint}: {e}") from None
    try:
        chosen = parse_pages(pages, len(doc))
        if not chosen:
            raise PdfError(f"{name}: the PDF has no pages")
        if len(chosen) > limits.max_pages:
            raise PdfError(f"{name}: {len(chosen)} pages selected, more than the limit of {limits.max_pages}; "
                           "choose fewer with pages (e.g. '1-3')")
        return [_render_page(doc[i], limits.max_pixels) for i in chosen]
    finally:
        doc.close()


def _render_page(page, max_pixels: int) -> Image.Image:
    width, height = page.get_size()          # PDF points (1/72 inch)
    scale = math.sqrt(max_pixels / max(width * height, 1.0))
    # pdfium rounds each side up to whole pixels; step down until the rounded page fits max_pixels
    while scale > 0.01 and math.ceil(width * scale) * math.ceil(height * scale) > max_pixels:
        scale *= 0.999
    return page.render(scale=scale).to_pil().convert("RGB")
