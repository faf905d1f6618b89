"""`qwenvl serve`'s log: one line per API request and a throughput line every few seconds while busy,
as vLLM's server prints them.

    POST /v1/chat/completions 200 prompt_tokens=52 completion_tokens=17 0.84s
    POST /v1/chat/completions 400 prompt_tokens=0 completion_tokens=0 0.01s: messages[0].role: 'bot' is not a ...
    throughput: prompt 310.2 tokens/s, generation 45.1 tokens/s, running 3, waiting 0, KV cache 12.5%

`TokenCounter` wraps the AsyncEngine the app is given and counts tokens as outputs pass; a context
variable set by the `AccessLog` middleware ties the counts to the HTTP request that asked for them
(tasks the request starts inherit it), so neither the routes nor the engine know about this log.
"""

from __future__ import annotations

import contextvars
import json
import logging
import threading
import time

log = logging.getLogger("qwenvl.server")

API_PREFIXES = ("/v1/", "/api/v1/", "/compatible-mode/")   # the UI's assets, /health and /metrics are not logged

_usage: contextvars.ContextVar[dict | None] = contextvars.ContextVar("qwenvl_request_usage", default=None)


class TokenCounter:
    """The AsyncEngine (every other attribute passes through) counting prompt and generated tokens: in total,
    for the throughput line, and per HTTP request (n choices: the prompt once, completions summed)."""

    def __init__(self, engine):
        self._engine = engine
        self.prompt_tokens = 0
        self.generated_tokens = 0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    async def generate(self, prompt, params, request_id):
        agen = self._engine.generate(prompt, params, request_id)
        seen = 0
        usage = _usage.get()
        try:
            async for out in agen:
                if seen == 0 and out.token_ids:
                    self.prompt_tokens += out.prompt_tokens            # the prefill is done
                    if usage is not None:
                        usage["prompt"] = max(usage["prompt"], out.prompt_tokens)
                new = len(out.token_ids) - seen
                seen = len(out.token_ids)
                self.generated_tokens += new
                if usage is not None:
                    usage["completion"] += new
                yield out
        finally:
            await agen.aclose()                    # a client gone: the engine's own cleanup runs now


class AccessLog:
    """ASGI middleware: after each API request, one line with method, route, status, tokens and seconds."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(API_PREFIXES):
            await self.app(scope, receive, send)
            return
        usage = {"prompt": 0, "completion": 0}
        token = _usage.set(usage)
        status = {"code": 500}
        error_body = bytearray()           # a 4xx/5xx answer's start: the line carries its reason
        t0 = time.perf_counter()

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "http.response.body" and status["code"] >= 400 and len(error_body) < REASON_BYTES:
                error_body.extend(message.get("body", b"")[:REASON_BYTES])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            _usage.reset(token)
            reason = error_reason(bytes(error_body)) if status["code"] >= 400 else ""
            log.info("%s %s %d prompt_tokens=%d completion_tokens=%d %.2fs%s", scope.get("method", ""), path,
                     status["code"], usage["prompt"], usage["completion"], time.perf_counter() - t0,
                     f": {reason}" if reason else "")


REASON_BYTES = 4096
REASON_CHARS = 300


def error_reason(body: bytes) -> str:
    """The message of an error answer in either API's shape, on one line and cut short ("" if none)."""
    try:
        data = json.loads(body)
    except ValueError:                   # cut at REASON_BYTES, or not JSON: no reason rather than a guess
        return ""
    if not isinstance(data, dict):
        return ""
    message = data.get("error", {}).get("message") if isinstance(data.get("error"), dict) else data.get("message")
    if not isinstance(message, str):
        return ""
    line = "".join(c if c.isprintable() else " " for c in message)     # a client's text cannot forge a log line
    return line if len(line) <= REASON_CHARS else line[:REASON_CHARS] + "..."


class ThroughputLog:
    """Every `every_s` seconds while tokens flow or requests wait: the rates since the last line, the running
    and waiting requests and the KV cache use (from engine.stats()). Nothing while idle."""

    def __init__(self, counter: TokenCounter, stats_fn, every_s: float = 5.0):
        self.counter, self.stats_fn, self.every_s = counter, stats_fn, every_s
        self._last = (time.monotonic(), counter.prompt_tokens, counter.generated_tokens)
        self._stop = threading.Event()

    def line(self) -> str | None:
        """The line for the interval since the previous call, or None when nothing happened in it."""
        now, prompt, generated = time.monotonic(), self.counter.prompt_tokens, self.counter.generated_tokens
        then, prompt0, generated0 = self._last
        self._last = (now, prompt, generated)
        try:
            stats = self.stats_fn()
        except Exception:  # noqa: BLE001 - the log must never stop the server
            stats = {}
        running, waiting = stats.get("num_running", 0), stats.get("num_waiting", 0)
        if prompt == prompt0 and generated == generated0 and not running and not waiting:
            return None
        dt = max(now - then, 1e-9)
        total = stats.get("kv_blocks_total") or 0
        kv = f"{100.0 * stats.get('kv_blocks_used', 0) / total:.1f}%" if total else "n/a"
        return (f"throughput: prompt {(prompt - prompt0) / dt:.1f} tokens/s, generation "
                f"{(generated - generated0) / dt:.1f} tokens/s, running {running}, waiting {waiting}, KV cache {kv}")

    def start(self) -> "ThroughputLog":
        threading.Thread(target=self._run, name="qwenvl-throughput-log", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            text = self.line()
            if text:
                log.info(text)
