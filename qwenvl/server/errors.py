"""One exception for every answer that is not a success, rendered in the shape of the route it hit.

OpenAI routes (and DashScope's OpenAI-compatible mode): {"error": {"message", "type", "param", "code"}}.
DashScope native routes: {"code", "message", "request_id"}. Messages never carry a stack trace.
"""

from __future__ import annotations

import uuid

from fastapi.responses import JSONResponse

# status -> (OpenAI error type, OpenAI code, DashScope code)
_KINDS = {
    400: ("invalid_request_error", "invalid_request", "InvalidParameter"),
    401: ("authentication_error", "invalid_api_key", "InvalidApiKey"),
    403: ("permission_error", "forbidden", "AccessDenied"),
    404: ("invalid_request_error", "not_found", "NotFound"),
    405: ("invalid_request_error", "method_not_allowed", "MethodNotAllowed"),
    413: ("invalid_request_error", "request_too_large", "RequestTooLarge"),
    415: ("invalid_request_error", "unsupported_media_type", "InvalidParameter"),
    422: ("invalid_request_error", "invalid_request", "InvalidParameter"),
    429: ("rate_limit_error", "rate_limit_exceeded", "Throttling"),
    500: ("server_error", "internal_error", "InternalError"),
    503: ("server_error", "service_unavailable", "ServiceUnavailable"),
}

# OpenAI codes (APIError.code) that DashScope names more precisely than its per-status code
_DASHSCOPE_CODES = {"model_not_found": "ModelNotFound"}


class APIError(Exception):
    """An error answer: HTTP status, a message the client can act on, optional field name and headers."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code                      # overrides the OpenAI code (DashScope keeps its own table)
        self.headers = headers or {}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def new_request_id() -> str:
    return str(uuid.uuid4())


def is_dashscope_path(path: str) -> bool:
    """Native DashScope routes answer in DashScope's shape; its compatible mode is OpenAI-shaped."""
    return path.startswith("/api/")


def openai_body(err: APIError) -> dict:
    kind, code, _ = _KINDS.get(err.status, _KINDS[500] if err.status >= 500 else _KINDS[400])
    return {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code or code}}


def dashscope_body(err: APIError, request_id: str) -> dict:
    _, _, code = _KINDS.get(err.status, _KINDS[500] if err.status >= 500 else _KINDS[400])
    code = _DASHSCOPE_CODES.get(err.code, code)
    return {"code": code, "message": err.message, "request_id": request_id}


def error_response(err: APIError, path: str, request_id: str | None = None) -> JSONResponse:
    if is_dashscope_path(path):
        body = dashscope_body(err, request_id or new_request_id())
    else:
        body = openai_body(err)
    return JSONResponse(body, status_code=err.status, headers=err.headers)
