"""What every chat route shares: messages -> checked prompt -> a running request in the engine.

Routes only translate shapes. Everything a client can get wrong is found here before the request is
queued, so it answers 4xx; the engine is handed only prompts that fit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator

from fastapi import Request
from starlette.requests import ClientDisconnect

from ..engine.errors import EngineFull, EngineStopped, GrammarCompileTimeout
from ..inputs import AdmissionPolicy, InputError, MediaRef, admit
from ..inputs.admission import count_media
from ..inputs.pdf import expand_documents
from ..structured.limits import check_schema_limits
from ..structured.spec import InvalidStructuredOutputError
from .errors import APIError, bad_request
from .media import MediaFetcher
from .metrics import Metrics
from .schemas import ChatRequest
from .settings import ServerSettings

if TYPE_CHECKING:  # the server must import without loading the model code
    from ..engine.info import EngineInfo

log = logging.getLogger("qwenvl.server")


@dataclass
class ServerState:
    engine: object                         # AsyncEngine (or a test double with the same methods)
    settings: ServerSettings
    fetcher: MediaFetcher
    model_names: tuple[str, ...]           # the served names (aliases); the first is the default
    max_model_len: int | None
    info: EngineInfo | None = None         # the engine's typed facts (device, dtype, tokenizer, ...)
    policy: AdmissionPolicy = field(default_factory=AdmissionPolicy)   # media limits, shared with the web demo
    api_key: str | None = None
    api_prefixes: tuple[str, ...] = ()     # the API's path prefixes, for a UI mounted beside it
    uploads: object | None = None          # the UploadStore of the dashscope SDK's local files (uploads.py)
    draining: bool = False
    inflight: int = 0
    started: float = field(default_factory=time.time)
    metrics: Metrics = field(init=False)   # set by the app right after: its in-flight gauge reads this state

    @property
    def model_name(self) -> str:
        return self.model_names[0]


def check_model(state: ServerState, name: str | None, param: str = "model") -> None:
    """vLLM's rule: a request may leave the model out, but a model it names must be one this server serves."""
    if name == "":
        raise APIError(400, f"{param}: must not be empty; leave it out for the served model, or name one of "
                       f"{', '.join(state.model_names)}", param=param)
    if name and name not in state.model_names:
        raise APIError(404, f"{param}: the model {_shown(name)} does not exist on this server; it serves "
                       f"{', '.join(state.model_names)} (see /v1/models)", param=param, code="model_not_found")


def _shown(name: str, most: int = 64) -> str:
    """A client's string for a message: quoted, and cut when long (an error must not echo a megabyte back)."""
    return repr(name) if len(name) <= most else f"{name[:most]!r}... ({len(name)} characters)"


def is_queue_full(exc: BaseException) -> bool:
    return isinstance(exc, EngineFull)


async def prepare(state: ServerState, req: ChatRequest, where: str = "", uploads=None):
    """Admit the messages (the policy's limits) and the output's schema (its size limits), fetch the media,
    build the prompt, size max_tokens; return (prompt, params). `uploads` reads the request's `oss://` URLs
    (server/uploads.py), when it may."""
    check_structured(state, req.params.structured)
    try:
        admitted = admit(req.messages, state.policy, req.high_resolution, where)
    except InputError as e:
        raise bad_request(str(e) if str(e).startswith(where) else f"{where}{e}") from None
    # Coroutines are made only here, together: every check above has passed.
    results = await asyncio.gather(*(_fetch(state.fetcher, ref, uploads) for ref in admitted.media), return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    try:
        conv = admitted.with_media(results)
        if any(ref.kind == "document" for ref in admitted.media):
            conv = await asyncio.get_running_loop().run_in_executor(None, _render_documents, conv, state.policy)
        prompt = await state.engine.prepare(conv, chat_template_kwargs=req.chat_template_kwargs,
                                            tools=list(req.tools.tools) if req.tools is not None else None)
    except InputError as e:
        raise bad_request(f"{where}{e}") from None
    return prompt, _size_max_tokens(state, req, len(prompt.token_ids), sum(v.num_tokens for v in prompt.vision))


def check_structured(state: ServerState, spec) -> None:
    """A 400 naming the limit for a schema past the size limits: its grammar would take too long to compile."""
    if spec is None or spec.schema_json is None:
        return
    try:
        check_schema_limits(spec.schema_json, state.settings.schema_limits, spec.source or "schema")
    except InvalidStructuredOutputError as e:
        raise bad_request(str(e), spec.source or None) from None


def structured_error(e: BaseException, params) -> APIError | None:
    """The answer for a structured request's grammar that failed to compile, or None for other errors."""
    spec = params.structured
    source = (spec.source if spec is not None else "") or "schema"
    if isinstance(e, GrammarCompileTimeout):
        return APIError(503, f"{source}: the schema's grammar {e} (--grammar-compile-timeout); simplify the "
                        "schema (fewer properties, less nesting, fewer anyOf branches)", param=source,
                        code="grammar_compile_timeout")
    if isinstance(e, InvalidStructuredOutputError):
        message = str(e)
        return APIError(400, message if message.startswith(source) else f"{source}: {message}",
                        param=e.param or source)
    return None


def _fetch(fetcher: MediaFetcher, ref: MediaRef, uploads):
    """A video file's bytes (inputs/video.py samples them), a PDF's bytes, or an image's / a frame's checked
    bytes."""
    if ref.kind == "video_file":
        return fetcher.load_video(ref.source, ref.where, uploads)
    if ref.kind == "document":
        return fetcher.load_document(ref.source, ref.where, uploads)
    return fetcher.load(ref.source, ref.where, uploads)


def _render_documents(conv, policy: AdmissionPolicy):
    """PDF pages as images (each at its part's pixel budget), then the image count again, pages included."""
    conv = expand_documents(conv, policy.default_pixels(False), max_pages=policy.max_images)
    count_media(conv, policy)
    return conv


def _size_max_tokens(state: ServerState, req: ChatRequest, n: int, image_tokens: int):
    limit = state.max_model_len
    params = req.params
    # Without max_tokens: the server's default, raised to the request's min_tokens, clamped to the context.
    default = max(state.settings.default_max_tokens, params.min_tokens)
    if limit is None:
        want = params.max_tokens if req.max_tokens_given else default
        return dataclasses.replace(params, max_tokens=want)
    detail = f"{n} tokens ({image_tokens} of them image tokens)"
    if n >= limit:
        raise APIError(400, f"the prompt is {detail}, but the model's context is {limit} tokens; shorten "
                       "the conversation, send fewer or smaller images (min_pixels/max_pixels), or lower "
                       "vl_high_resolution_images", code="context_length_exceeded")
    room = limit - n
    if req.max_tokens_given:
        if params.max_tokens > room:
            raise APIError(400, f"the prompt is {detail} and max_tokens is {params.max_tokens}: together "
                           f"{n + params.max_tokens}, over the model's context of {limit} tokens; ask for at "
                           f"most {room} tokens", param="max_tokens", code="context_length_exceeded")
        return params
    if params.min_tokens > room:
        raise APIError(400, f"the prompt is {detail} and min_tokens is {params.min_tokens}: together "
                       f"{n + params.min_tokens}, over the model's context of {limit} tokens; ask for at "
                       f"most {room} tokens", param="min_tokens", code="context_length_exceeded")
    return dataclasses.replace(params, max_tokens=min(room, default))


async def start(state: ServerState, prompt, params, request_id: str, request: Request | None = None):
    """Queue the request and wait for its first output: (first_output, iterator over the rest).

    Waiting for the first output before answering lets a full queue or a prompt the engine refuses become
    a proper 4xx status instead of an error inside a 200 stream. A client that leaves while the request
    waits in the queue aborts it.
    """
    agen = state.engine.generate(prompt, params, request_id)
    first_task = asyncio.ensure_future(agen.__anext__())
    watcher = asyncio.create_task(watch_disconnect(request, first_task)) if request is not None else None
    try:
        first = await first_task
    except asyncio.CancelledError:
        await close_quietly(agen)
        state.engine.abort(request_id)
        if watcher is not None and watcher.done():          # the client left; nobody reads this answer
            raise ClientDisconnect() from None
        raise
    except StopAsyncIteration:
        raise APIError(500, "the engine ended the request without output") from None
    except Exception as e:
        await close_quietly(agen)
        if isinstance(e, EngineStopped):
            raise APIError(503, f"{e}; retry on another replica", headers={"Retry-After": "5"}) from None
        structured = structured_error(e, params)
        if structured is not None:
            raise structured from None
        if is_queue_full(e):
            retry = state.settings.retry_after_s
            raise APIError(429, f"the server is busy ({e}); retry in {retry} s", headers={"Retry-After": str(retry)}) \
                from None
        if isinstance(e, ValueError):
            raise bad_request(str(e)) from None
        raise
    finally:
        if watcher is not None:
            watcher.cancel()
    if first.error and first.finished and not first.token_ids:
        raise bad_request(first.error)
    return first, agen


async def close_quietly(agen) -> None:
    try:
        await agen.aclose()
    except Exception:  # noqa: BLE001 - closing a failed iterator must not hide the first error
        pass


async def outputs(state: ServerState, first, agen, request_id: str, route: str, t0: float) -> AsyncIterator:
    """Yield the first output and the rest; on early exit (client gone) abort the request in the engine."""
    finished = False
    ttft_seen = False
    last = first
    try:
        out = first
        while True:
            if not ttft_seen and out.token_ids:
                state.metrics.ttft.labels(route).observe(time.perf_counter() - t0)
                ttft_seen = True
            last = out
            yield out
            if out.finished:
                finished = True
                return
            out = await agen.__anext__()
    finally:
        if not finished:
            await close_quietly(agen)
            state.engine.abort(request_id)
        else:
            state.metrics.latency.labels(route).observe(time.perf_counter() - t0)
            state.metrics.prompt_tokens.inc(last.prompt_tokens)
            state.metrics.generation_tokens.inc(len(last.token_ids))


async def watch_disconnect(request: Request, task: asyncio.Task) -> None:
    """Cancel `task` (a non-streaming request's generation) when the client goes away."""
    while not task.done():
        message = await request.receive()
        if message["type"] == "http.disconnect":
            task.cancel()
            return


async def collect(state: ServerState, first, agen, request_id: str, route: str, t0: float):
    """Run one request to its final output."""
    last = first
    async for out in outputs(state, first, agen, request_id, route, t0):
        last = out
    return last


async def until_disconnect(request: Request, work):
    """Await `work` (a non-streaming response's generation); cancel it if the client disconnects meanwhile."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(watch_disconnect(request, task))
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done():               # the client left (not a server shutdown): nobody reads this answer
            raise ClientDisconnect() from None
        raise
    finally:
        watcher.cancel()


def logprob_entries(tokenizer, out, start: int, k: int) -> list[dict]:
    """OpenAI's logprobs.content entries for generated tokens [start:], from the engine's {id: logprob}."""
    entries = []
    if not out.logprobs:
        return entries
    for i in range(start, min(len(out.logprobs), len(out.token_ids))):
        chosen, table = out.token_ids[i], out.logprobs[i]
        top = sorted(table.items(), key=lambda kv: -kv[1])
        entries.append({**_token_entry(tokenizer, chosen, table.get(chosen, top[0][1] if top else 0.0)),
                        "top_logprobs": [_token_entry(tokenizer, t, lp) for t, lp in top[:k]]})
    return entries


# OpenAI's API reports a token it rules out (here: one a grammar masks, whose logprob is -inf) as -9999.0,
# and so does vLLM: JSON has no infinity, and the SDKs expect a number
LOGPROB_FLOOR = -9999.0


def _token_entry(tokenizer, token_id: int, logprob: float) -> dict:
    try:
        text = _remembered_token_text(tokenizer, token_id)
    except TypeError:                   # a tokenizer that cannot be a dictionary key (a test double)
        text = _token_text(tokenizer, token_id)
    return {"token": text, "logprob": max(float(logprob), LOGPROB_FLOOR), "bytes": list(text.encode("utf-8"))}


@functools.lru_cache(maxsize=1 << 16)
def _remembered_token_text(tokenizer, token_id: int) -> str:
    """_token_text, remembered: a streamed request with logprobs asks for the text of every token it generates
    (and of its alternatives), a tokenizer call each, ~5% of the event loop at 32 clients (issue 37)."""
    return _token_text(tokenizer, token_id)


def _token_text(tokenizer, token_id: int) -> str:
    if tokenizer is None:
        return f"<{token_id}>"
    try:
        return tokenizer.decode([token_id])
    except Exception:  # noqa: BLE001 - an unknown id gets a placeholder, never a 500
        return f"<{token_id}>"
