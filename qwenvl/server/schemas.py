"""Request bodies -> one ChatRequest, with a 400 naming the field for every wrong value or type.

Hand-written rather than pydantic models: the messages must name the field the way the client wrote it
(`parameters.top_p`, `stream_options.include_usage`) and unknown fields must pass (SDKs add new ones often).
"""

from __future__ import annotations

import math

import dataclasses
from dataclasses import dataclass

from ..sampling_params import SamplingParams, with_defaults
from ..structured.limits import SchemaLimits, SchemaTooLargeError
from ..structured.spec import InvalidStructuredOutputError, StructuredOutput
from ..structured.tools import ToolUse, parse_tool_use
from .errors import bad_request

MAX_CHOICES = 8                       # n: choices per request, as vLLM's default limit

_SP_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


@dataclass
class ChatRequest:
    model: str | None
    messages: list
    params: SamplingParams
    max_tokens_given: bool
    stream: bool = False
    include_usage: bool = False       # OpenAI stream_options.include_usage
    incremental: bool = False         # DashScope incremental_output
    result_format: str = "message"    # DashScope: message | text
    logprobs: bool = False
    high_resolution: bool = False     # vl_high_resolution_images
    tools: ToolUse | None = None      # declared tools and tool_choice (None: no tools)
    n: int = 1                        # choices for the one prompt
    chat_template_kwargs: dict | None = None   # template variables, e.g. {"enable_thinking": false}
    ocr_task: str | None = None       # DashScope ocr_options.task
    ocr_result_schema: dict | None = None   # its task_config.result_schema


# ---------------------------------------------------------------- field readers
def _get(obj: dict, key: str, where: str, kinds: tuple, kind_name: str):
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds:
        raise bad_request(f"{where}{key}: must be {kind_name}, got a boolean", f"{where}{key}")
    if not isinstance(value, kinds):
        raise bad_request(f"{where}{key}: must be {kind_name}, got {type(value).__name__}", f"{where}{key}")
    return value


def number(obj, key, where="", lo=None, hi=None, hi_open=False):
    v = _get(obj, key, where, (int, float), "a number")
    if v is not None:
        if not math.isfinite(v):           # JSON's NaN / Infinity, which Python's parser accepts
            raise bad_request(f"{where}{key}: must be a finite number, got {v}", f"{where}{key}")
        if (lo is not None and v < lo) or (hi is not None and (v >= hi if hi_open else v > hi)):
            rng = f"[{lo}, {hi})" if hi_open else f"[{lo}, {hi}]"
            raise bad_request(f"{where}{key}: {v} is out of range {rng}", f"{where}{key}")
        v = float(v)
    return v


def integer(obj, key, where="", lo=None, hi=None):
    v = _get(obj, key, where, (int,), "an integer")
    if v is not None and ((lo is not None and v < lo) or (hi is not None and v > hi)):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise bad_request(f"{where}{key}: must be {bound}, got {v}", f"{where}{key}")
    return v


def boolean(obj, key, where=""):
    return _get(obj, key, where, (bool,), "true or false")


def string(obj, key, where=""):
    return _get(obj, key, where, (str,), "a string")


def obj_field(obj, key, where=""):
    return _get(obj, key, where, (dict,), "an object")


def stops(obj, key, where=""):
    v = obj.get(key)
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        if len(v) > 16:
            raise bad_request(f"{where}{key}: at most 16 stop strings, got {len(v)}", f"{where}{key}")
        return tuple(s for s in v if s)
    raise bad_request(f"{where}{key}: must be a string or a list of strings", f"{where}{key}")


def _messages(body: dict, where: str) -> list:
    messages = body.get("messages")
    if messages is None:
        raise bad_request(f"{where}messages: required (a list of {{'role', 'content'}} objects)", f"{where}messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request(f"{where}messages: must be a non-empty list, got {type(messages).__name__}",
                          f"{where}messages")
    return messages


def sampling_params(p: dict, where: str, max_tokens: int | None, logprobs: int | None,
                    defaults: dict | None = None) -> SamplingParams:
    """The request's sampling fields; `max_tokens` None means the request gave none (1 stands in for it)."""
    max_tokens_given = max_tokens is not None
    max_tokens = max_tokens or 1
    args = dict(
        temperature=number(p, "temperature", where, 0, 2),
        top_p=number(p, "top_p", where, 0, 1),
        top_k=integer(p, "top_k", where, -1),
        seed=integer(p, "seed", where, 0, 2 ** 63 - 1),
        stop=stops(p, "stop", where),
        repetition_penalty=number(p, "repetition_penalty", where, 0),
        presence_penalty=number(p, "presence_penalty", where, -2, 2),
        ignore_eos=boolean(p, "ignore_eos", where),
        min_tokens=integer(p, "min_tokens", where, 0),
        max_tokens=max_tokens,
        logprobs=logprobs,
    )
    if args["min_tokens"] is not None and max_tokens_given and args["min_tokens"] > max_tokens:
        raise bad_request(f"{where}min_tokens: {args['min_tokens']} is more than max_tokens ({max_tokens})",
                          f"{where}min_tokens")
    if not max_tokens_given:     # a placeholder until the server sizes max_tokens to the context
        args["max_tokens"] = max(max_tokens, args["min_tokens"] or 0)
    freq = number(p, "frequency_penalty", where, -2, 2)
    if freq:
        if "frequency_penalty" not in _SP_FIELDS:
            raise bad_request(f"{where}frequency_penalty: not supported by this server; use presence_penalty "
                              "or repetition_penalty", f"{where}frequency_penalty")
        args["frequency_penalty"] = freq
    if args["top_p"] == 0:  # OpenAI accepts 0: keep only the most likely token, i.e. greedy decoding
        args["temperature"], args["top_p"] = 0.0, 1.0
    if args["repetition_penalty"] == 0:
        raise bad_request(f"{where}repetition_penalty: must be > 0", f"{where}repetition_penalty")
    args = with_defaults(args, defaults)     # what the request leaves out: the checkpoint's generation_config
    try:
        return SamplingParams(**args)
    except ValueError as e:
        raise bad_request(f"{where.rstrip('.') or 'request'}: {e}") from None


def _response_format(p: dict, where: str, limits: SchemaLimits | None) -> StructuredOutput | None:
    """OpenAI's (and DashScope's) response_format -> the output's grammar; None for plain text."""
    rf = obj_field(p, "response_format", where)
    if rf is None:
        return None
    at = f"{where}response_format."
    kind = string(rf, "type", at)
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return StructuredOutput.json_object()
    if kind != "json_schema":
        raise bad_request(f"{at}type: must be text, json_object or json_schema, got {kind!r}", f"{at}type")
    spec = obj_field(rf, "json_schema", at)
    if spec is None or "schema" not in spec:
        raise bad_request(f"{at}json_schema: required, {{\"name\": ..., \"schema\": {{...}}}}", f"{at}json_schema")
    try:
        return dataclasses.replace(StructuredOutput.json_schema(spec["schema"], limits),
                                   source=f"{at}json_schema.schema")
    except InvalidStructuredOutputError as e:
        raise bad_request(f"{at}json_schema.schema: {e}", f"{at}json_schema.schema") from None


def _tools(p: dict, where: str, limits: SchemaLimits | None) -> ToolUse | None:
    try:
        return parse_tool_use(p.get("tools"), p.get("tool_choice"), where, limits)
    except InvalidStructuredOutputError as e:
        message = str(e)
        raise bad_request(message, e.param or message.split(":", 1)[0]) from None


def _constrained(p: dict, where: str, params: SamplingParams,
                 limits: SchemaLimits | None) -> tuple[SamplingParams, ToolUse | None]:
    """Add the response_format grammar, or the one tool_choice forces, to params."""
    structured = _response_format(p, where, limits)
    if structured is not None:
        params = dataclasses.replace(params, structured=structured)
    use = _tools(p, where, limits)
    if use is not None:
        try:
            params = use.constrain(params)
        except SchemaTooLargeError as e:         # the forced call's grammar: every allowed tool's schema
            raise bad_request(f"{where}tools: {e}", f"{where}tools") from None
        except InvalidStructuredOutputError as e:
            raise bad_request(f"{where}{e}", f"{where}tool_choice") from None
        if params.structured is not None and params.structured.kind == "tool_call":
            params = dataclasses.replace(params, structured=dataclasses.replace(params.structured,
                                                                                source=f"{where}tools"))
    return params, use


def _template_kwargs(p: dict, where: str) -> dict | None:
    """chat_template_kwargs (vLLM) and enable_thinking (DashScope) as the template's variables."""
    kwargs = obj_field(p, "chat_template_kwargs", where)
    thinking = boolean(p, "enable_thinking", where)
    if thinking is not None:
        kwargs = {**(kwargs or {}), "enable_thinking": thinking}
    return kwargs


def _top_logprobs(p: dict, where: str) -> int | None:
    want = boolean(p, "logprobs", where)
    top = integer(p, "top_logprobs", where, 0, 20)
    if top is not None and not want:
        raise bad_request(f"{where}top_logprobs: requires {where}logprobs to be true", f"{where}top_logprobs")
    return (top or 0) if want else None


# ---------------------------------------------------------------- OpenAI
def parse_openai(body: dict, defaults: dict | None = None, limits: SchemaLimits | None = None) -> ChatRequest:
    """`limits`: the server's schema size limits (checked before any schema work)."""
    messages = _messages(body, "")
    n = integer(body, "n", "", 1, MAX_CHOICES) or 1
    max_tokens = integer(body, "max_completion_tokens", "", 1)
    if max_tokens is None:
        max_tokens = integer(body, "max_tokens", "", 1)
    stream = bool(boolean(body, "stream"))
    options = obj_field(body, "stream_options") or {}
    include_usage = bool(boolean(options, "include_usage", "stream_options."))
    top = _top_logprobs(body, "")
    params, tools = _constrained(body, "", sampling_params(body, "", max_tokens, top, defaults), limits)
    return ChatRequest(model=string(body, "model"), messages=messages, params=params,
                       max_tokens_given=max_tokens is not None, stream=stream, include_usage=include_usage,
                       logprobs=top is not None, high_resolution=bool(boolean(body, "vl_high_resolution_images")),
                       tools=tools, n=n, chat_template_kwargs=_template_kwargs(body, ""))


# ---------------------------------------------------------------- DashScope
def parse_dashscope(body: dict, sse_header: bool, defaults: dict | None = None,
                    limits: SchemaLimits | None = None) -> ChatRequest:
    inp = obj_field(body, "input")
    if inp is None:
        raise bad_request("input: required, an object holding messages: {\"input\": {\"messages\": [...]}}", "input")
    messages = _messages(inp, "input.")
    p = obj_field(body, "parameters") or {}
    w = "parameters."
    max_tokens = integer(p, "max_tokens", w, 1)
    n = integer(p, "n", w, 1, MAX_CHOICES) or 1
    fmt = string(p, "result_format", w) or "message"
    if fmt not in ("message", "text"):
        raise bad_request(f"{w}result_format: must be 'message' or 'text', got {fmt!r}", f"{w}result_format")
    top = _top_logprobs(p, w)
    params, tools = _constrained(p, w, sampling_params(p, w, max_tokens, top, defaults), limits)
    ocr = obj_field(p, "ocr_options", w) or {}
    task = string(ocr, "task", f"{w}ocr_options.")
    task_config = obj_field(ocr, "task_config", f"{w}ocr_options.") or {}
    result_schema = obj_field(task_config, "result_schema", f"{w}ocr_options.task_config.")
    stream = sse_header or bool(boolean(p, "stream", w))
    return ChatRequest(model=string(body, "model"), messages=messages, params=params,
                       max_tokens_given=max_tokens is not None, stream=stream,
                       incremental=bool(boolean(p, "incremental_output", w)), result_format=fmt,
                       logprobs=top is not None, high_resolution=bool(boolean(p, "vl_high_resolution_images", w)),
                       tools=tools, n=n, ocr_task=task, ocr_result_schema=result_schema,
                       chat_template_kwargs=_template_kwargs(p, w))
