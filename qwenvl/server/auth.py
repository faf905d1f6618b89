"""API key check: `Authorization: Bearer KEY` (the OpenAI and DashScope SDKs both send it)."""

from __future__ import annotations

import hmac

from .errors import APIError


def check_api_key(headers: dict[str, str], expected: str | None) -> None:
    """Raise 401 unless the request carries the key. Constant-time; the key is never logged or echoed."""
    if not expected:
        return
    auth = headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'")
    if not hmac.compare_digest(token.strip().encode("utf-8"), expected.encode("utf-8")):
        raise APIError(401, "invalid API key")
