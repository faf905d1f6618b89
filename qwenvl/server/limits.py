"""The request body, read in bounded pieces (media limits: inputs/admission.py)."""

from __future__ import annotations

import json

from fastapi import Request

from .errors import APIError, bad_request


async def read_json_body(request: Request, max_bytes: int) -> dict:
    """The body as a JSON object: 415 unless sent as application/json, 413 over `max_bytes` (checked while
    reading, not after), 400 for bad JSON."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise APIError(415, f"the body must be sent with 'Content-Type: application/json', got "
                       f"{content_type[:60] or 'no Content-Type'!r}")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise APIError(413, f"request body is {length} bytes, over the limit of {max_bytes} bytes "
                       f"({max_bytes / 2 ** 20:.0f} MB); send smaller or fewer images")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise APIError(413, f"request body is over the limit of {max_bytes} bytes "
                           f"({max_bytes / 2 ** 20:.0f} MB); send smaller or fewer images")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise bad_request("request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise bad_request("request body is not UTF-8 text; send a JSON object") from None
    except json.JSONDecodeError as e:
        raise bad_request(f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:       # e.g. 100,000 nested '[': the parser recurses once per level
        raise bad_request("request body is nested too deeply; no API field needs more than a few levels") from None
    if not isinstance(body, dict):
        raise bad_request(f"request body must be a JSON object, got a JSON {type(body).__name__}")
    return body
