"""OpenAI-compatible chat completions (also served at DashScope's /compatible-mode/v1)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..engine.errors import EngineStopped
from . import generation as gen, json_text
from .answer import AnswerStream, final_answer, openai_delta_calls
from .choices import Choices, usage_totals
from .errors import APIError, openai_body
from .limits import read_json_body
from .schemas import ChatRequest, parse_openai
from .uploads import reader_for


def _usage(outs: list) -> dict:
    prompt, completion = usage_totals(outs)
    details = {"cached_tokens": outs[0].cached_tokens, "image_tokens": outs[0].image_tokens}
    if outs[0].video_tokens:                  # only requests with a video carry the field
        details["video_tokens"] = outs[0].video_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": details}


def _sse(obj) -> str:
    return f"data: {json_text.dumps(obj)}\n\n"


@dataclass
class _Reply:
    """One chat completion being answered: the parsed request, its prompt and the response's fixed fields."""
    req: ChatRequest
    prompt: object                   # PromptInputs
    choices: Choices
    model: str
    tokenizer: object | None
    k: int                           # top_logprobs
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        return self.choices.response_id

    def final_choice(self, index: int, out) -> dict:
        answer = final_answer(out.text, out.finish_reason, self.req.tools, self.prompt.reasoning_opened)
        message = {"role": "assistant", "content": answer.content, "boxes": out.boxes}
        if answer.reasoning is not None:
            message["reasoning_content"] = answer.reasoning
        if answer.calls:
            message["tool_calls"] = [c.to_openai() for c in answer.calls]
        logprobs = {"content": self.logprobs(out, 0)} if self.req.logprobs else None
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": answer.finish_reason}

    def logprobs(self, out, start: int) -> list[dict]:
        return gen.logprob_entries(self.tokenizer, out, start, self.k)

    def chunk(self, index: int, delta: dict, finish=None, logprobs=None) -> dict:
        c = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
             "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        if self.req.include_usage:
            c["usage"] = None
        return c

    def usage_chunk(self, finals: list) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": _usage(finals)}


async def chat_completions(request: Request):
    state = request.app.state.qwenvl
    route = request.scope.get("route_label", request.url.path)
    t0 = time.perf_counter()
    body = await read_json_body(request, state.settings.max_body_bytes)
    # off the event loop: checking a large schema against its metaschema takes a second or more (pure Python,
    # so it shares the GIL, but the loop keeps serving the other requests meanwhile)
    req = await asyncio.to_thread(parse_openai, body, state.info.generation_defaults if state.info else None,
                                  state.settings.schema_limits)
    gen.check_model(state, req.model)
    # DashScope's compatible mode reads the SDK's oss:// uploads too (with the opt-in header); OpenAI's /v1 never
    uploads = reader_for(state.uploads, request.headers) if request.url.path.startswith("/compatible-mode/") else None
    prompt, params = await gen.prepare(state, req, uploads=uploads)
    choices = Choices(state, f"chatcmpl-{uuid.uuid4().hex}", req.n)
    await choices.start(prompt, params, request)
    reply = _Reply(req, prompt, choices, req.model or state.model_name,
                   state.info.tokenizer if state.info else None, params.logprobs or 0)
    if not req.stream:
        return await _complete(reply, request, route, t0)
    return StreamingResponse(_events(reply, route, t0), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _complete(reply: _Reply, request: Request, route: str, t0: float) -> JSONResponse:
    outs = await reply.choices.run_to_end(request, route, t0)
    failed = next((o.error for o in outs if o.error), None)
    if failed:
        raise APIError(500, f"generation failed: {failed}")
    return JSONResponse({
        "id": reply.id, "object": "chat.completion", "created": reply.created, "model": reply.model,
        "choices": [reply.final_choice(i, out) for i, out in enumerate(outs)], "usage": _usage(outs)})


async def _events(reply: _Reply, route: str, t0: float):
    n = reply.req.n
    for i in range(n):
        yield _sse(reply.chunk(i, {"role": "assistant", "content": ""}))
    sent_tokens, finals = [0] * n, [None] * n
    streams = [AnswerStream(reply.req.tools, reply.prompt.reasoning_opened) for _ in range(n)]
    try:
        async for i, out in reply.choices.stream(route, t0):
            if out.error and out.finished:
                yield _sse(openai_body(APIError(500, f"generation failed: {out.error}")))
                return
            logprobs = None
            if reply.req.logprobs and len(out.token_ids) > sent_tokens[i]:
                logprobs = {"content": reply.logprobs(out, sent_tokens[i])}
                sent_tokens[i] = len(out.token_ids)
            for event in _choice_events(reply, i, out, streams[i], logprobs):
                yield _sse(event)
            if out.finished:
                finals[i] = out
        if reply.req.include_usage:
            yield _sse(reply.usage_chunk(finals))
    except EngineStopped as e:          # the drain's grace ran out: say so in-band
        yield _sse(openai_body(APIError(503, f"{e}; the answer is incomplete")))
        return
    except Exception:  # noqa: BLE001 - headers are sent: report in-band, never a trace
        gen.log.exception("stream %s failed", reply.id)
        yield _sse(openai_body(APIError(500, "internal error while generating")))
        return
    yield "data: [DONE]\n\n"


def _choice_events(reply: _Reply, i: int, out, stream: AnswerStream, logprobs) -> list[dict]:
    """The chunks one engine output of choice i becomes: reasoning, completed tool calls, then content."""
    step = stream.feed(out.delta_text, out.finished)
    events = []
    if step.reasoning:
        events.append(reply.chunk(i, {"reasoning_content": step.reasoning}))
    if step.calls:
        events.append(reply.chunk(i, {"tool_calls": openai_delta_calls(step.calls)}))
    if out.finished:
        final = reply.chunk(i, {"content": step.content, "boxes": out.boxes}, stream.finish_reason(out.finish_reason),
                            logprobs)
        # boxes ride in the last chunk's delta and, as in a non-streamed answer, in `message`
        final["choices"][0]["message"] = {"role": "assistant", "boxes": out.boxes}
        events.append(final)
    elif step.content or logprobs:
        events.append(reply.chunk(i, {"content": step.content}, None, logprobs))
    return events


def _model_card(state, name: str) -> dict:
    return {"id": name, "object": "model", "created": int(state.started), "owned_by": "qwenvl",
            "max_model_len": state.max_model_len}


async def list_models(request: Request):
    state = request.app.state.qwenvl
    return JSONResponse({"object": "list", "data": [_model_card(state, name) for name in state.model_names]})


async def retrieve_model(request: Request):
    """GET /v1/models/{id}: one served model (the openai SDK's models.retrieve), else 404 model_not_found."""
    state = request.app.state.qwenvl
    name = request.path_params["model"]
    gen.check_model(state, name)
    return JSONResponse(_model_card(state, name))
