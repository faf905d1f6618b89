"""API key check: `Authorization: Bearer KEY` (the OpenAI and DashScope SDKs both send it)."""

from __future__ import annotations

import hmac
import logging

from .errors import APIError

log = logging.getLogger("qwenvl.server")


def check_api_key(headers: dict[str, str], expected: str | None) -> None:
    """Raise 401 unless the request carries the key. Constant-time; the key is never logged or echoed."""
    if not expected:
        return
    auth = headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if auth and scheme.lower() != "bearer":
        _refuse(f"the '{scheme[:16]}' authorization scheme is not accepted: use a Bearer key "
                "('Authorization: Bearer <key>')")
    if scheme.lower() != "bearer" or not token.strip():
        _refuse("missing API key: send the header 'Authorization: Bearer <key>'")
    if not hmac.compare_digest(token.strip().encode("utf-8"), expected.encode("utf-8")):
        _refuse("invalid API key")


def _refuse(reason: str) -> None:
    """Failed logins are logged (an operator wants to see probing) with the reason only, never the key sent."""
    log.warning("refused a request: %s", reason)
    raise APIError(401, reason)
