"""`/api/v1/uploads`: the dashscope SDK's getPolicy (GET) and its form upload (POST); the store: uploads.py.

The form is parsed by Starlette's multipart parser over a byte-counted stream (413 as soon as the body passes
the policy's cap), the file lands in the store's folder, and its content is sniffed like any other media: an
image header PIL knows, a PDF, or a container with a video stream; anything else is refused before it is kept.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from starlette.formparsers import MultiPartException, MultiPartParser

from ..inputs.pdf import is_pdf
from .errors import APIError, bad_request
from .generation import check_model
from .media import FORMATS

FORM_OVERHEAD = 64 * 1024        # the form's other fields and part headers, beside the file itself
_FIELDS = ("policy", "Signature", "key")


async def get_policy(request: Request):
    state = request.app.state.qwenvl
    action = request.query_params.get("action")
    if action != "getPolicy":
        raise bad_request(f"action: {str(action)[:40]!r} is not supported; use action=getPolicy", "action")
    model = request.query_params.get("model")
    if model:
        check_model(state, model)
    host = str(request.url.replace(query="", fragment=""))
    data = state.uploads.issue(state.uploads.owner_of(request.headers.get("authorization")), host)
    return JSONResponse({"request_id": request.state.request_id, "data": data})


async def upload(request: Request):
    """The form post; 200 with the key on success (the SDK only looks at the status)."""
    state = request.app.state.qwenvl
    store = state.uploads
    cap = store.limits.file_bytes + FORM_OVERHEAD
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > cap:
        raise APIError(413, f"the upload is {length} bytes, over the limit of {store.limits.file_bytes} bytes per file")
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise APIError(415, "an upload is a multipart/form-data form (policy, Signature, key, file), as the "
                       "dashscope SDK sends it")
    if store.arriving >= store.limits.concurrent:
        raise APIError(429, f"{store.arriving} uploads are arriving, the most this server takes at once; retry "
                       "in a moment", headers={"Retry-After": "1"})
    store.arriving += 1
    try:
        return await _receive(request, state, store, cap)
    finally:
        store.arriving -= 1


async def _receive(request: Request, state, store, cap: int):
    try:
        form = await MultiPartParser(request.headers, _capped(request.stream(), cap, store.limits.file_bytes),
                                     max_files=1, max_fields=16, max_part_size=FORM_OVERHEAD).parse()
    except MultiPartException as e:
        raise bad_request(f"the upload form does not parse: {e.message}") from None
    try:
        missing = [f for f in (*_FIELDS, "file") if f not in form]
        if missing:
            raise bad_request(f"the upload form lacks {', '.join(missing)} (send the fields of the getPolicy "
                              "answer, the key and the file)", missing[0])
        file = form["file"]
        if isinstance(file, str):
            raise bad_request("file: must be a file part of the form", "file")
        grant, name = store.check_form(*(str(form[f]) for f in _FIELDS))
        partial = store.partial_path()
        try:
            size = await asyncio.to_thread(_save, file.file, partial, grant.max_bytes)
            kind = await asyncio.to_thread(sniff, partial)
            if kind == "image" and size > state.policy.max_image_bytes:
                raise APIError(413, f"the image is {size} bytes, over the limit of {state.policy.max_image_bytes} "
                               "bytes per image")
            key = store.put(grant, name, partial, kind)
        finally:
            partial.unlink(missing_ok=True)
    finally:
        await form.close()
    return JSONResponse({"request_id": request.state.request_id, "key": key, "kind": kind, "size": size})


async def _capped(stream, cap: int, file_bytes: int):
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > cap:
            raise APIError(413, f"the upload is over the limit of {file_bytes} bytes per file")
        yield chunk


def _save(source, target: Path, max_bytes: int) -> int:
    with open(target, "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
        size = out.tell()
    if size == 0:
        raise bad_request("file: the uploaded file is empty", "file")
    if size > max_bytes:
        raise APIError(413, f"the file is {size} bytes, over the limit of {max_bytes} bytes per file")
    return size


def sniff(path: Path) -> str:
    """"image", "pdf" or "video" from the file's content (never its name or declared type); 400 otherwise."""
    with open(path, "rb") as f:
        head = f.read(1024)
    if is_pdf(head):
        return "pdf"
    try:
        with Image.open(path) as im:
            if im.format in FORMATS:
                return "image"
    except (UnidentifiedImageError, Image.DecompressionBombError):
        pass                                   # too many pixels: refused by the header check when used
    except Exception:  # noqa: BLE001 - a corrupt header is the client's problem
        pass
    streams = _streams(path)
    if "video" in streams:
        return "video"
    if "audio" in streams:
        raise APIError(415, "file: an audio file; this server reads images, videos and PDFs, not audio",
                       param="file")
    raise APIError(415, "file: not an image (PNG, JPEG, WebP, GIF, BMP, TIFF), a video or a PDF", param="file")


def _streams(path: Path) -> set[str]:
    import av

    try:
        with av.open(str(path), mode="r", metadata_errors="ignore") as container:
            return {s.type for s in container.streams}
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError):
        return set()
