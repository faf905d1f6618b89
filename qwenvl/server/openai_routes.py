"""OpenAI-compatible chat completions (also served at DashScope's /compatible-mode/v1)."""

from __future__ import annotations

import json
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from . import generation as gen
from .answer import AnswerStream, final_answer, openai_delta_calls
from .choices import Choices, usage_totals
from .errors import APIError, openai_body
from .limits import read_json_body
from .schemas import parse_openai

def _usage(outs: list) -> dict:
    prompt, completion = usage_totals(outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": outs[0].cached_tokens, "image_tokens": outs[0].image_tokens}}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _final_choice(index: int, req, prompt, out, tokenizer, k: int) -> dict:
    answer = final_answer(out.text, out.finish_reason, req.tools, prompt.reasoning_opened)
    message = {"role": "assistant", "content": answer.content, "boxes": out.boxes}
    if answer.reasoning is not None:
        message["reasoning_content"] = answer.reasoning
    if answer.calls:
        message["tool_calls"] = [c.to_openai() for c in answer.calls]
    logprobs = {"content": gen.logprob_entries(tokenizer, out, 0, k)} if req.logprobs else None
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": answer.finish_reason}


async def chat_completions(request: Request):
    state = request.app.state.qwenvl
    route = request.scope.get("route_label", request.url.path)
    t0 = time.perf_counter()
    body = await read_json_body(request, state.settings.max_body_bytes)
    req = parse_openai(body)
    prompt, params = await gen.prepare(state, req)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    choices = Choices(state, rid, req.n)
    await choices.start(prompt, params, request)
    model = req.model or state.model_name
    created = int(time.time())
    tokenizer = state.info.tokenizer if state.info else None
    k = params.logprobs or 0

    if not req.stream:
        outs = await choices.run_to_end(request, route, t0)
        failed = next((o.error for o in outs if o.error), None)
        if failed:
            raise APIError(500, f"generation failed: {failed}")
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [_final_choice(i, req, prompt, out, tokenizer, k) for i, out in enumerate(outs)],
            "usage": _usage(outs)})

    def chunk(index: int, delta: dict, finish=None, logprobs=None) -> dict:
        c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        if req.include_usage:
            c["usage"] = None
        return c

    async def events():
        sent_tokens = [0] * req.n
        splitters = [AnswerStream(req.tools, prompt.reasoning_opened) for _ in range(req.n)]
        finals: list = [None] * req.n
        for i in range(req.n):
            yield _sse(chunk(i, {"role": "assistant", "content": ""}))
        try:
            async for i, out in choices.stream(route, t0):
                if out.error and out.finished:
                    yield _sse(openai_body(APIError(500, f"generation failed: {out.error}")))
                    return
                logprobs = None
                if req.logprobs and len(out.token_ids) > sent_tokens[i]:
                    logprobs = {"content": gen.logprob_entries(tokenizer, out, sent_tokens[i], k)}
                    sent_tokens[i] = len(out.token_ids)
                step = splitters[i].feed(out.delta_text, out.finished)
                text = step.content
                if step.reasoning:
                    yield _sse(chunk(i, {"reasoning_content": step.reasoning}))
                if step.calls:
                    yield _sse(chunk(i, {"tool_calls": openai_delta_calls(step.calls)}))
                if out.finished:
                    finish = splitters[i].finish_reason(out.finish_reason)
                    final = chunk(i, {"content": text, "boxes": out.boxes}, finish, logprobs)
                    # boxes ride in the last chunk's delta and, as in a non-streamed answer, in `message`
                    final["choices"][0]["message"] = {"role": "assistant", "boxes": out.boxes}
                    yield _sse(final)
                    finals[i] = out
                elif text or logprobs:
                    yield _sse(chunk(i, {"content": text}, None, logprobs))
            if req.include_usage:
                yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                            "model": model, "choices": [], "usage": _usage(finals)})
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
