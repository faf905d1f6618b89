"""DashScope-compatible multimodal generation: JSON, or SSE events framed the way DashScope frames them."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..engine.errors import EngineStopped
from . import generation as gen, json_text
from .answer import AnswerStream, final_answer
from .choices import Choices, usage_totals
from ..answers.ocr import OcrTaskError, apply_to_messages, ocr_request, postprocess
from .errors import APIError, bad_request, dashscope_body
from .limits import read_json_body
from .schemas import parse_dashscope
from .uploads import reader_for


def _usage(outs: list) -> dict:
    prompt, completion = usage_totals(outs)
    image, video = outs[0].image_tokens, outs[0].video_tokens
    details = {"image_tokens": image, "text_tokens": prompt - image - video}
    usage = {"input_tokens": prompt, "output_tokens": completion, "total_tokens": prompt + completion,
             "input_tokens_details": details, "image_tokens": image}
    if video:                                 # as DashScope does: video_tokens only when a video was sent
        details["video_tokens"] = usage["video_tokens"] = video
    return usage


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


def _with_ocr_task(req, family: str, limits):
    """The request with the OCR task's prompt in place of the user's text and the task's grammar, if any."""
    where = "parameters.ocr_options."
    try:
        task = ocr_request(req.ocr_task, family, req.ocr_result_schema, where, limits)
        messages = apply_to_messages(req.messages, task.prompt)
    except OcrTaskError as e:
        message = str(e)
        raise bad_request(message, message.split(":", 1)[0]) from None
    params = req.params
    if task.structured is not None:
        if params.structured is not None:
            raise bad_request(f"{where}task: {req.ocr_task} cannot be combined with response_format or a forced "
                              "tool call", f"{where}task")
        params = dataclasses.replace(params, structured=dataclasses.replace(
            task.structured, source=f"{where}task_config.result_schema"))
    return dataclasses.replace(req, messages=messages, params=params)


def _event(n: int, kind: str, status: int, payload: dict) -> str:
    return f"id:{n}\nevent:{kind}\n:HTTP_STATUS/{status}\ndata:{json_text.dumps(payload)}\n\n"


@dataclass
class _ChoiceStream:
    """What one streamed choice has produced so far (DashScope's non-incremental events repeat it whole)."""
    answer: AnswerStream
    content: str = ""
    reasoning: str = ""
    sent_tokens: int = 0
    latest: object = None            # its newest RequestOutput


async def generation(request: Request):
    state = request.app.state.qwenvl
    route = request.scope.get("route_label", request.url.path)
    rid = request.state.request_id
    t0 = time.perf_counter()
    body = await read_json_body(request, state.settings.max_body_bytes)
    sse_header = request.headers.get("x-dashscope-sse", "").lower()
    if sse_header not in ("", "enable", "disable"):
        raise bad_request(f"X-DashScope-SSE: must be 'enable' or 'disable', got {sse_header[:40]!r}", "X-DashScope-SSE")
    sse = sse_header == "enable"
    # off the event loop: a large schema's metaschema check takes a second or more (see openai_routes)
    req = await asyncio.to_thread(parse_dashscope, body, sse, state.info.generation_defaults if state.info else None,
                                  state.settings.schema_limits)
    gen.check_model(state, req.model)
    if req.n > 1 and req.result_format == "text":
        raise APIError(400, "parameters.n: several choices need result_format 'message'", param="parameters.n")
    if req.ocr_task is not None:
        req = await asyncio.to_thread(_with_ocr_task, req, state.info.family if state.info else "qwen2_vl",
                                      state.settings.schema_limits)
    prompt, params = await gen.prepare(state, req, where="input.", uploads=reader_for(state.uploads, request.headers))
    choices = Choices(state, rid, req.n)
    await choices.start(prompt, params, request)
    tokenizer = state.info.tokenizer if state.info else None
    k = params.logprobs or 0
    if not req.stream:
        outs = await choices.run_to_end(request, route, t0)
        return JSONResponse({"output": _final_output(req, prompt, outs, tokenizer, k), "usage": _usage(outs),
                             "request_id": rid})
    return StreamingResponse(_events(req, prompt, choices, tokenizer, k, route, t0), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                      "X-DashScope-Request-Id": rid})


def _index(req, i: int) -> int | None:
    return i if req.n > 1 else None           # a choice's index is only written when there are several


def _final_output(req, prompt, outs: list, tokenizer, k: int) -> dict:
    failed = next((o.error for o in outs if o.error), None)
    if failed:
        raise APIError(500, f"generation failed: {failed}")
    answers = []
    for i, out in enumerate(outs):
        logprobs = gen.logprob_entries(tokenizer, out, 0, k) if req.logprobs else None
        a = final_answer(out.text, out.finish_reason, req.tools, prompt.reasoning_opened)
        answers.append((a.content, a.finish_reason, out, logprobs, list(enumerate(a.calls)), _index(req, i),
                        a.reasoning))
    if req.result_format == "text":
        return _text_output(req, *answers[0][:3])
    return {"choices": [_choice(req, *a) for a in answers]}


async def _events(req, prompt, choices: Choices, tokenizer, k: int, route: str, t0: float):
    rid, n = choices.response_id, 0
    streams = [_ChoiceStream(AnswerStream(req.tools, prompt.reasoning_opened)) for _ in range(req.n)]
    try:
        async for i, out in choices.stream(route, t0):
            streams[i].latest = out
            if out.error and out.finished:
                yield _event(n + 1, "error", 500, dashscope_body(APIError(500, f"generation failed: {out.error}"), rid))
                return
            output = _stream_output(req, i, out, streams[i], tokenizer, k)
            if output is not None:
                n += 1
                usage = _usage([c.latest for c in streams if c.latest is not None])
                yield _event(n, "result", 200, {"output": output, "usage": usage, "request_id": rid})
    except EngineStopped as e:          # the drain's grace ran out: say so in-band
        yield _event(n + 1, "error", 503, dashscope_body(APIError(503, f"{e}; the answer is incomplete"), rid))
    except Exception:  # noqa: BLE001 - headers are sent: report in-band, never a trace
        gen.log.exception("stream %s failed", rid)
        yield _event(n + 1, "error", 500, dashscope_body(APIError(500, "internal error while generating"), rid))


def _stream_output(req, i: int, out, cs: _ChoiceStream, tokenizer, k: int) -> dict | None:
    """The `output` of the event one engine output of choice i becomes; None when it adds nothing."""
    step = cs.answer.feed(out.delta_text, out.finished)
    cs.content += step.content
    cs.reasoning += step.reasoning
    if not (out.finished or step.content or step.calls or step.reasoning):
        return None
    logprobs = None
    if req.logprobs:
        logprobs = gen.logprob_entries(tokenizer, out, cs.sent_tokens if req.incremental else 0, k)
        cs.sent_tokens = len(out.token_ids)
    # an OCR task's result is whole, in the last event, even when streaming increments
    whole = not req.incremental or (req.ocr_task is not None and out.finished)
    text = cs.content if whole else step.content
    reasoning = step.reasoning if req.incremental else cs.reasoning
    calls = step.calls if req.incremental else list(enumerate(cs.answer.calls))
    finish = cs.answer.finish_reason(out.finish_reason) if out.finished else "null"
    if req.result_format == "text":
        return _text_output(req, text, finish, out)
    return {"choices": [_choice(req, text, finish, out, logprobs, calls, _index(req, i), reasoning)]}
