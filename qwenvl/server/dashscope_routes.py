"""DashScope-compatible multimodal generation: JSON, or SSE events framed the way DashScope frames them."""

from __future__ import annotations

import json
import time

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from . import generation as gen
from .errors import APIError, dashscope_body
from .limits import read_json_body
from .schemas import parse_dashscope


def _usage(out) -> dict:
    prompt, completion = out.prompt_tokens, len(out.token_ids)
    video = out.video_tokens
    details = {"image_tokens": out.image_tokens, "text_tokens": prompt - out.image_tokens - video}
    usage = {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion,
             "input_tokens_details": details, "image_tokens": out.image_tokens}
    if video:                                 # as DashScope does: video_tokens only when a video was sent
        details["video_tokens"] = usage["video_tokens"] = video
    return usage


def _output(req, text: str, finish: str, out, logprobs) -> dict:
    final = out.finished
    if req.result_format == "text":
        o = {"text": text, "finish_reason": finish}
        if final:
            o["boxes"] = out.boxes
        return o
    message = {"role": "assistant", "content": [{"text": text}]}
    if final:
        message["boxes"] = out.boxes
    choice = {"finish_reason": finish, "message": message}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return {"choices": [choice]}


def _event(n: int, kind: str, status: int, payload: dict) -> str:
    return f"id:{n}\nevent:{kind}\n:HTTP_STATUS/{status}\ndata:{json.dumps(payload, ensure_ascii=False)}\n\n"


async def generation(request: Request):
    state = request.app.state.qwenvl
    route = request.scope.get("route_label", request.url.path)
    rid = request.state.request_id
    t0 = time.perf_counter()
    body = await read_json_body(request, state.settings.max_body_bytes)
    sse = request.headers.get("x-dashscope-sse", "").lower() == "enable"
    req = parse_dashscope(body, sse)
    prompt, params = await gen.prepare(state, req, where="input.")
    first, agen = await gen.start(state, prompt, params, rid, request)
    tokenizer = state.info.tokenizer if state.info else None
    k = params.logprobs or 0

    if not req.stream:
        out = await gen.run_to_end(request, state, first, agen, rid, route, t0)
        if out.error:
            raise APIError(500, f"generation failed: {out.error}")
        logprobs = gen.logprob_entries(tokenizer, out, 0, k) if req.logprobs else None
        return JSONResponse({"output": _output(req, out.text, out.finish_reason, out, logprobs),
                             "usage": _usage(out), "request_id": rid})

    async def events():
        n, sent_tokens = 0, 0
        try:
            async for out in gen.outputs(state, first, agen, rid, route, t0):
                if out.error and out.finished:
                    n += 1
                    yield _event(n, "error", 500, dashscope_body(APIError(500, f"generation failed: {out.error}"), rid))
                    return
                if not (out.finished or out.delta_text):
                    continue
                logprobs = None
                if req.logprobs:
                    start = sent_tokens if req.incremental else 0
                    logprobs = gen.logprob_entries(tokenizer, out, start, k)
                    sent_tokens = len(out.token_ids)
                text = out.delta_text if req.incremental else out.text
                finish = out.finish_reason if out.finished else "null"
                n += 1
                yield _event(n, "result", 200, {"output": _output(req, text, finish, out, logprobs),
                                                "usage": _usage(out), "request_id": rid})
        except Exception:  # noqa: BLE001 - headers are sent: report in-band, never a trace
            gen.log.exception("stream %s failed", rid)
            yield _event(n + 1, "error", 500, dashscope_body(APIError(500, "internal error while generating"), rid))

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                      "X-DashScope-Request-Id": rid})
