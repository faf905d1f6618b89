"""The OpenAPI 3.1 document of the server (GET /openapi.json), built from openapi_models.py.

The routes read raw bodies (so errors name fields as the client wrote them), which FastAPI cannot
describe by itself; this module writes the document once from the pydantic models instead.
"""

from __future__ import annotations

from pydantic.json_schema import models_json_schema

from . import openapi_models as m

_ERROR_STATUSES = {"400": "a field is wrong or the prompt does not fit; the message names the field. A "
                          "response_format / tools / result_schema schema past a size limit (--max-schema-bytes, "
                          "--max-schema-properties, --max-schema-depth) is a 400 naming the limit",
                   "401": "missing or wrong API key",
                   "404": "the request names a model this server does not serve (code model_not_found)",
                   "413": "the body is over the size limit",
                   "405": "the route does not take this method (the Allow header lists those it takes)",
                   "415": "the body is not sent with Content-Type: application/json",
                   "429": "the queue is full; retry after Retry-After seconds",
                   "503": "the server is shutting down, or a schema's grammar did not compile within "
                          "--grammar-compile-timeout seconds (code grammar_compile_timeout)"}
# One server-sent event: `data` holds a JSON chunk (OpenAI: chat.completion.chunk or "[DONE]"; DashScope: a
# response with the answer so far or its delta).
_SSE = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}}}}}


def _ref(model) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model) -> dict:
    return {"application/json": {"schema": _ref(model)}}


def _errors(model) -> dict:
    return {code: {"description": why, "content": _json(model)} for code, why in _ERROR_STATUSES.items()}


def _chat(summary: str, request, response, error, extra_params=()) -> dict:
    return {"post": {
        "summary": summary,
        "parameters": list(extra_params),
        "requestBody": {"required": True, "content": _json(request)},
        "responses": {"200": {"description": "the answer, or with stream: true its server-sent events",
                              "content": {**_json(response), **_SSE}},
                      **_errors(error)}}}


_AUTH_AND_METHOD = {"401": {"description": "missing or wrong API key", "content": _json(m.OpenAIError)},
                    "405": {"description": "a method other than GET or HEAD", "content": _json(m.OpenAIError)}}


def _models() -> dict:
    return {"get": {"summary": "the served model and its context length",
                    "responses": {"200": {"description": "one model", "content": _json(m.ModelList)},
                                  **_AUTH_AND_METHOD}}}


def _model() -> dict:
    """GET .../models/{model}: the openai SDK's models.retrieve."""
    return {"get": {"summary": "one served model (a Hub id keeps its slash: /v1/models/Org/Name)",
                    "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                    "responses": {"200": {"description": "the model", "content": _json(m.ModelCard)},
                                  "404": {"description": "not a model this server serves (code model_not_found)",
                                          "content": _json(m.OpenAIError)},
                                  **_AUTH_AND_METHOD}}}


def _errors_of(statuses: dict[str, str]) -> dict:
    return {code: {"description": why, "content": _json(m.DashScopeError)} for code, why in statuses.items()}


def _uploads() -> dict:
    """The dashscope SDK's upload of a local file: getPolicy, then the form (server/uploads.py)."""
    form = {"type": "object", "required": ["policy", "Signature", "key", "file"], "properties": {
        "OSSAccessKeyId": {"type": "string"}, "policy": {"type": "string"}, "Signature": {"type": "string"},
        "key": {"type": "string", "description": "upload_dir + '/' + the file's name"},
        "success_action_status": {"type": "string"}, "file": {"type": "string", "format": "binary"}}}
    return {
        "get": {"summary": "an upload policy for one local file (the dashscope SDK asks before it uploads)",
                "parameters": [
                    {"name": "action", "in": "query", "required": True, "schema": {"type": "string",
                                                                                   "enum": ["getPolicy"]}},
                    {"name": "model", "in": "query", "required": False, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "the policy", "content": _json(m.UploadPolicyResponse)},
                              **_errors_of({"400": "action is not getPolicy", "401": "missing or wrong API key",
                                            "404": "the model is not served here",
                                            "503": "the server is shutting down"})}},
        "post": {"summary": "the form upload of one file, authenticated by its signed policy",
                 "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form}}},
                 "responses": {"200": {"description": "stored", "content": _json(m.UploadResult)},
                               **_errors_of({"400": "a field is missing or wrong, or the file is empty",
                                             "403": "the policy was not issued by this server, or it expired",
                                             "413": "the file is over the size limit",
                                             "415": "not a form, or the file is no image, video or PDF",
                                             "429": "too many uploads arriving at once; retry after Retry-After",
                                             "503": "the server is shutting down"})}}}


def openapi_document(title: str, version: str, paths: dict[str, str]) -> dict:
    """`paths` maps each route kind ("openai_chat", "compat_chat", "dashscope", "models", "compat_models",
    "uploads") to its path."""
    requests = [m.ChatCompletionRequest, m.DashScopeRequest]
    responses = [m.ChatCompletion, m.ModelList, m.ModelCard, m.OpenAIError, m.DashScopeResponse, m.DashScopeError,
                 m.Health, m.UploadPolicyResponse, m.UploadResult]
    _, defs = models_json_schema([(x, "validation") for x in requests] + [(x, "serialization") for x in responses],
                                 ref_template="#/components/schemas/{model}")
    sse_header = {"name": "X-DashScope-SSE", "in": "header", "required": False,
                  "description": "enable: answer as server-sent events; disable (or absent): one JSON answer; any "
                                 "other value is a 400",
                  "schema": {"type": "string", "enum": ["enable", "disable"]}}
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": {
            paths["openai_chat"]: _chat("OpenAI chat completions", m.ChatCompletionRequest, m.ChatCompletion,
                                        m.OpenAIError),
            paths["compat_chat"]: _chat("DashScope's OpenAI-compatible mode", m.ChatCompletionRequest,
                                        m.ChatCompletion, m.OpenAIError),
            paths["dashscope"]: _chat("DashScope multimodal generation", m.DashScopeRequest, m.DashScopeResponse,
                                      m.DashScopeError, [sse_header]),
            paths["models"]: _models(),
            paths["compat_models"]: _models(),
            paths["models"] + "/{model}": _model(),
            paths["compat_models"] + "/{model}": _model(),
            paths["uploads"]: _uploads(),
            "/health": {"get": {"summary": "liveness", "responses": {
                "200": {"description": "serving", "content": _json(m.Health)},
                "405": {"description": "a method other than GET or HEAD", "content": _json(m.OpenAIError)},
                "503": {"description": "draining (SIGTERM), or stalled: the engine has not stepped for "
                                       "--health-stall-timeout seconds while requests wait",
                        "content": _json(m.Health)}}}},
        },
        "components": {"schemas": defs.get("$defs", {})},
    }
