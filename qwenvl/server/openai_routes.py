"""OpenAI-compatible chat completions (also served at DashScope's /compatible-mode/v1)."""

from __future__ import annotations

import json
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from . import generation as gen
from .errors import APIError, openai_body
from .limits import read_json_body
from .schemas import parse_openai

def _usage(out) -> dict:
    prompt, completion = out.prompt_tokens, len(out.token_ids)
    details = {"cached_tokens": out.cached_tokens, "image_tokens": out.image_tokens}
    if out.video_tokens:                      # only requests with a video carry the field
        details["video_tokens"] = out.video_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": details}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def chat_completions(request: Request):
    state = request.app.state.qwenvl
    route = request.scope.get("route_label", request.url.path)
    t0 = time.perf_counter()
    body = await read_json_body(request, state.settings.max_body_bytes)
    req = parse_openai(body)
    prompt, params = await gen.prepare(state, req)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    first, agen = await gen.start(state, prompt, params, rid, request)
    model = req.model or state.model_name
    created = int(time.time())
    tokenizer = state.info.tokenizer if state.info else None
    k = params.logprobs or 0

    if not req.stream:
        out = await gen.run_to_end(request, state, first, agen, rid, route, t0)
        if out.error:
            raise APIError(500, f"generation failed: {out.error}")
        message = {"role": "assistant", "content": out.text, "boxes": out.boxes}
        logprobs = {"content": gen.logprob_entries(tokenizer, out, 0, k)} if req.logprobs else None
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": out.finish_reason}],
            "usage": _usage(out)})

    def chunk(delta: dict, finish=None, logprobs=None, usage=False) -> dict:
        c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        if req.include_usage:
            c["usage"] = None
        return c

    async def events():
        sent_tokens = 0
        yield _sse(chunk({"role": "assistant", "content": ""}))
        try:
            async for out in gen.outputs(state, first, agen, rid, route, t0):
                if out.error and out.finished:
                    yield _sse(openai_body(APIError(500, f"generation failed: {out.error}")))
                    return
                logprobs = None
                if req.logprobs and len(out.token_ids) > sent_tokens:
                    logprobs = {"content": gen.logprob_entries(tokenizer, out, sent_tokens, k)}
                    sent_tokens = len(out.token_ids)
                if out.finished:
                    final = chunk({"content": out.delta_text, "boxes": out.boxes}, out.finish_reason, logprobs)
                    # boxes ride in the last chunk's delta and, as in a non-streamed answer, in `message`
                    final["choices"][0]["message"] = {"role": "assistant", "boxes": out.boxes}
                    yield _sse(final)
                    if req.include_usage:
                        yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                    "model": model, "choices": [], "usage": _usage(out)})
                elif out.delta_text or logprobs:
                    yield _sse(chunk({"content": out.delta_text}, None, logprobs))
        except Exception:  # noqa: BLE001 - headers are sent: report in-band, never a trace
            gen.log.exception("stream %s failed", rid)
            yield _sse(openai_body(APIError(500, "internal error while generating")))
            return
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def list_models(request: Request):
    state = request.app.state.qwenvl
    return JSONResponse({"object": "list", "data": [{
        "id": state.model_name, "object": "model", "created": int(state.started), "owned_by": "qwenvl",
        "max_model_len": state.max_model_len}]})
