"""DashScope-compatible multimodal generation: JSON, or SSE events framed the way DashScope frames them."""

from __future__ import annotations

import dataclasses
import json
import time

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from . import generation as gen
from .answer import AnswerStream, final_answer
from .choices import Choices, usage_totals
from ..ocr import OcrTaskError, apply_to_messages, ocr_request, postprocess
from .errors import APIError, bad_request, dashscope_body
from .limits import read_json_body
from .schemas import parse_dashscope


def _usage(outs: list) -> dict:
    prompt, completion = usage_totals(outs)
    image = outs[0].image_tokens
    return {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion,
            "input_tokens_details": {"image_tokens": image, "text_tokens": prompt - image},
            "image_tokens": image}


def _choice(req, text: str | None, finish: str, out, logprobs, calls=(), index: int | None = None,
            reasoning: str | None = None) -> dict:
    if req.ocr_task is not None and out.finished:      # the task's shape, with its ocr_result
        content = [postprocess(req.ocr_task, text or "", out.boxes).to_dashscope()]
    else:
        content = [{"text": text}] if text is not None else []
    message = {"role": "assistant", "content": content}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [{"index": i, **c.to_openai()} for i, c in calls]
    if out.finished:
        message["boxes"] = out.boxes
    choice = {"finish_reason": finish, "message": message}
    if index is not None:                       # n > 1: which choice this is
        choice["index"] = index
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return choice


def _text_output(req, text: str | None, finish: str, out) -> dict:
    if req.ocr_task is not None and out.finished:
        text = postprocess(req.ocr_task, text or "", out.boxes).text
    o = {"text": text or "", "finish_reason": finish}
    if out.finished:
        o["boxes"] = out.boxes
    return o


def _with_ocr_task(req, family: str):
    """The request with the OCR task's prompt in place of the user's text and the task's grammar, if any."""
    where = "parameters.ocr_options."
    try:
        task = ocr_request(req.ocr_task, family, req.ocr_result_schema, where)
        messages = apply_to_messages(req.messages, task.prompt)
    except OcrTaskError as e:
        message = str(e)
        raise bad_request(message, message.split(":", 1)[0]) from None
    params = req.params
    if task.structured is not None:
        if params.structured is not None:
            raise bad_request(f"{where}task: {req.ocr_task} cannot be combined with response_format or a forced "
                              "tool call", f"{where}task")
        params = dataclasses.replace(params, structured=task.structured)
    return dataclasses.replace(req, messages=messages, params=params)


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
    if req.n > 1 and req.result_format == "text":
        raise APIError(400, "parameters.n: several choices need result_format 'message'", param="parameters.n")
    if req.ocr_task is not None:
        req = _with_ocr_task(req, state.info.family if state.info else "qwen2_vl")
    prompt, params = await gen.prepare(state, req, where="input.")
    choices = Choices(state, rid, req.n)
    await choices.start(prompt, params, request)
    tokenizer = state.info.tokenizer if state.info else None
    k = params.logprobs or 0
    index = (lambda i: i) if req.n > 1 else (lambda i: None)

    if not req.stream:
        outs = await choices.run_to_end(request, route, t0)
        failed = next((o.error for o in outs if o.error), None)
        if failed:
            raise APIError(500, f"generation failed: {failed}")
        answers = []
        for i, out in enumerate(outs):
            logprobs = gen.logprob_entries(tokenizer, out, 0, k) if req.logprobs else None
            a = final_answer(out.text, out.finish_reason, req.tools, prompt.reasoning_opened)
            answers.append((a.content, a.finish_reason, out, logprobs, list(enumerate(a.calls)), index(i), a.reasoning))
        if req.result_format == "text":
            output = _text_output(req, *answers[0][:3])
        else:
            output = {"choices": [_choice(req, *a) for a in answers]}
        return JSONResponse({"output": output, "usage": _usage(outs), "request_id": rid})

    async def events():
        n, sent_tokens = 0, [0] * req.n
        splitters = [AnswerStream(req.tools, prompt.reasoning_opened) for _ in range(req.n)]
        contents, thoughts = [""] * req.n, [""] * req.n
        latest: list = [None] * req.n
        try:
            async for i, out in choices.stream(route, t0):
                latest[i] = out
                if out.error and out.finished:
                    n += 1
                    yield _event(n, "error", 500, dashscope_body(APIError(500, f"generation failed: {out.error}"), rid))
                    return
                step = splitters[i].feed(out.delta_text, out.finished)
                delta, calls = step.content, step.calls
                contents[i] += delta
                thoughts[i] += step.reasoning
                if not (out.finished or delta or calls or step.reasoning):
                    continue
                logprobs = None
                if req.logprobs:
                    start = sent_tokens[i] if req.incremental else 0
                    logprobs = gen.logprob_entries(tokenizer, out, start, k)
                    sent_tokens[i] = len(out.token_ids)
                # an OCR task's result is whole, in the last event, even when streaming increments
                whole = not req.incremental or (req.ocr_task is not None and out.finished)
                text = contents[i] if whole else delta
                reasoning = step.reasoning if req.incremental else thoughts[i]
                if not req.incremental:          # each event holds the whole answer so far
                    calls = list(enumerate(splitters[i].calls))
                finish = splitters[i].finish_reason(out.finish_reason) if out.finished else "null"
                if req.result_format == "text":
                    output = _text_output(req, text, finish, out)
                else:
                    output = {"choices": [_choice(req, text, finish, out, logprobs, calls, index(i), reasoning)]}
                n += 1
                yield _event(n, "result", 200, {"output": output, "usage": _usage([o for o in latest if o]),
                                                "request_id": rid})
        except Exception:  # noqa: BLE001 - headers are sent: report in-band, never a trace
            gen.log.exception("stream %s failed", rid)
            yield _event(n + 1, "error", 500, dashscope_body(APIError(500, "internal error while generating"), rid))

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                      "X-DashScope-Request-Id": rid})
