"""The API key also guards the web UI: an ASGI gate in front of every path the UI serves.

Gradio's own `auth` guards the routes Gradio chose to guard; this gate sits in front of all of them
(page, config, uploads, files, queue, SSE, websockets, static assets), so nothing of the UI answers
without the key. A browser logs in once at `/login` with the key and gets an HttpOnly cookie (an HMAC of
the key, so it stops working when the key changes); programs may send `Authorization: Bearer KEY`.
The HTTP APIs, `/health`, `/metrics` and `/openapi.json` pass through untouched: the server handles them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import json
from urllib.parse import parse_qs

COOKIE = "qwenvl_session"
LOGIN, LOGOUT = "/login", "/logout"
MAX_FORM_BYTES = 4096


def session_token(key: str) -> str:
    return hmac.new(key.encode("utf-8"), b"qwenvl-web-session-v1", hashlib.sha256).hexdigest()


def _cookies(headers: dict[str, str]) -> dict[str, str]:
    out = {}
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name:
            out[name] = value
    return out


_LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>qwenvl: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;display:flex;justify-content:center;margin-top:15vh;color:#222}}
form{{border:1px solid #ccc;border-radius:8px;padding:24px 28px;min-width:300px}}input{{width:100%;padding:8px;
margin:8px 0 16px;box-sizing:border-box}}button{{padding:8px 18px}}.err{{color:#b00020}}</style></head>
<body><form method="post" action="/login"><h2>qwenvl</h2>{error}<label for="key">API key</label>
<input id="key" name="key" type="password" autocomplete="current-password" autofocus>
<button type="submit">Sign in</button></form></body></html>"""


class WebAuthGate:
    """Pure ASGI middleware: UI paths need the session cookie or the bearer key; `open_prefixes` pass."""

    def __init__(self, app, api_key: str, open_prefixes: tuple[str, ...], open_paths: tuple[str, ...] = ()):
        self.app = app
        self.key = api_key.encode("utf-8")
        self.token = session_token(api_key).encode("ascii")
        self.open_prefixes = open_prefixes
        self.open_paths = open_paths

    def _authorised(self, headers: dict[str, str]) -> bool:
        cookie = _cookies(headers).get(COOKIE, "")
        if cookie and hmac.compare_digest(cookie.encode("latin-1"), self.token):
            return True
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("utf-8"), self.key)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path.startswith(self.open_prefixes) or path in self.open_paths:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if scope["type"] == "http" and path == LOGIN:
            await self._login(scope, receive, send)
            return
        if scope["type"] == "http" and path == LOGOUT:
            await _respond(send, 303, b"", [(b"location", LOGIN.encode()), (b"set-cookie", _cookie(""))])
            return
        if self._authorised(headers):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})   # before accept: the handshake gets 403
            return
        if scope.get("method") == "GET" and "text/html" in headers.get("accept", ""):
            await _respond(send, 303, b"", [(b"location", LOGIN.encode())])
            return
        body = json.dumps({"error": {"message": "the web UI needs the API key: sign in at /login or send "
                                     "'Authorization: Bearer <key>'", "type": "authentication_error",
                                     "code": "invalid_api_key"}}).encode()
        await _respond(send, 401, body, [(b"content-type", b"application/json")])

    async def _login(self, scope, receive, send):
        if scope.get("method") == "POST":
            form = await _read_form(receive)
            given = (form.get("key") or [""])[0].encode("utf-8")
            if hmac.compare_digest(given, self.key):
                await _respond(send, 303, b"", [(b"location", b"/"), (b"set-cookie", _cookie(self.token.decode()))])
                return
            await asyncio.sleep(0.5)                 # slow down guessing
            page = _LOGIN_PAGE.format(error='<p class="err">That key is not right.</p>')
            await _respond(send, 401, page.encode(), [(b"content-type", b"text/html; charset=utf-8")])
            return
        await _respond(send, 200, _LOGIN_PAGE.format(error="").encode(),
                       [(b"content-type", b"text/html; charset=utf-8")])


def _cookie(value: str) -> bytes:
    age = "" if value else "; Max-Age=0"
    return f"{COOKIE}={html.escape(value)}; Path=/; HttpOnly; SameSite=Lax{age}".encode("latin-1")


async def _read_form(receive) -> dict[str, list[str]]:
    chunks, total = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > MAX_FORM_BYTES:
            return {}
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return parse_qs(b"".join(chunks).decode("utf-8", "replace"))


async def _respond(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers = headers + [(b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
