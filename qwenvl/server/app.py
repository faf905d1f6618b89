"""create_app(async_engine, settings): the FastAPI app serving both APIs, /health and /metrics.

A small ASGI gate in front of the API routes does what every request needs before any route code runs:
refuse new work while draining (503), check the API key (401), answer a wrong path or method in the API
family's shape (404/405), count requests in flight, and record requests by route and status (a client that
hung up counts as 499). `/` is left free: `mount_ui(app)` (the web UI) is called last.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from ..engine.errors import EngineStopped
from ..inputs.admission import AdmissionPolicy
from . import dashscope_routes, openai_routes, upload_routes
from .auth import check_api_key
from .errors import APIError, error_response, is_dashscope_path, new_request_id
from .generation import ServerState
from .media import MediaFetcher, MediaPolicy
from .metrics import Metrics
from .openapi import openapi_document
from .settings import ServerSettings
from .uploads import UploadLimits, UploadStore

log = logging.getLogger("qwenvl.server")

OPENAI_CHAT = "/v1/chat/completions"
COMPAT_CHAT = "/compatible-mode/v1/chat/completions"
DASHSCOPE_GEN = "/api/v1/services/aigc/multimodal-generation/generation"
UPLOADS = "/api/v1/uploads"      # the dashscope SDK's getPolicy (GET) and form upload (POST) of a local file
API_PREFIXES = ("/v1/", "/api/", "/compatible-mode/")
CLIENT_CLOSED = 499     # nginx's "client closed request": what the metrics count for a hang-up
# every API route and its methods: the gate answers a wrong path or method itself, in the family's shape,
# so a UI mounted at "/" never answers for the API prefixes
ROUTES = {OPENAI_CHAT: ("POST",), COMPAT_CHAT: ("POST",), DASHSCOPE_GEN: ("POST",), UPLOADS: ("GET", "POST"),
          "/v1/models": ("GET", "HEAD"), "/compatible-mode/v1/models": ("GET", "HEAD"),
          "/v1/models/{model}": ("GET", "HEAD"), "/compatible-mode/v1/models/{model}": ("GET", "HEAD")}
MODEL_PREFIXES = ("/v1/models/", "/compatible-mode/v1/models/")     # the openai SDK's models.retrieve(id)


def create_app(async_engine, settings: ServerSettings | None = None,
               mount_ui: Callable[[FastAPI], None] | None = None) -> FastAPI:
    """The HTTP app over a running AsyncEngine. The caller owns the engine (serve() shuts it down)."""
    state = _server_state(async_engine, settings or ServerSettings())

    @asynccontextmanager
    async def lifespan(app):
        yield
        await state.fetcher.aclose()
        state.uploads.close()

    app = FastAPI(title="qwenvl", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.qwenvl = state
    _install_error_handlers(app)
    _add_api_routes(app)
    _add_service_routes(app, state)
    if mount_ui is not None:
        mount_ui(app)
    app.add_middleware(_Gate, state=state)
    if state.settings.cors_origins:      # outermost: a browser's preflight needs no key
        app.add_middleware(CORSMiddleware, allow_origins=list(state.settings.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    return app


def _server_state(async_engine, settings: ServerSettings) -> ServerState:
    info = async_engine.info()
    fetcher = MediaFetcher(MediaPolicy(
        allowed_local_media_path=settings.allowed_local_media_path, allow_private_urls=settings.allow_private_urls,
        connect_timeout_s=settings.fetch_connect_timeout_s, read_timeout_s=settings.fetch_read_timeout_s,
        total_timeout_s=settings.fetch_total_timeout_s,
        max_bytes=settings.max_image_bytes, max_video_bytes=settings.max_video_bytes, max_pixels=settings.max_image_pixels,
        max_redirects=settings.max_redirects))
    state = ServerState(
        engine=async_engine, settings=settings, fetcher=fetcher,
        model_names=settings.served_model_names or (info.model_name or "qwenvl",), info=info,
        max_model_len=info.max_model_len,
        policy=AdmissionPolicy(max_images=settings.max_images, max_video_frames=settings.max_video_frames,
                               max_image_bytes=settings.max_image_bytes, max_image_pixels=settings.max_image_pixels,
                               max_video_bytes=settings.max_video_bytes,
                               pixel_factor=info.pixel_factor, default_max_pixels=info.default_max_pixels),
        api_key=settings.resolved_api_key(), api_prefixes=API_PREFIXES,
        uploads=UploadStore(settings.upload_dir, UploadLimits(
            ttl_s=settings.upload_ttl_s, store_bytes=int(settings.upload_store_mb * 2 ** 20),
            file_bytes=max(settings.max_image_bytes, settings.max_video_bytes), concurrent=settings.upload_concurrency)))
    state.metrics = Metrics(async_engine.stats, lambda: state.inflight)    # reads the live count at scrape time
    return state


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc, request.url.path, _request_id(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 405 and exc.headers and "Allow" in exc.headers:     # say what the route takes
            message = f"{request.url.path[:200]} does not take {request.method[:20]}; use {exc.headers['Allow']}"
        return error_response(APIError(exc.status_code, message, headers=exc.headers), request.url.path,
                              _request_id(request))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(APIError(400, f"invalid request: {exc.errors()[:3]}"), request.url.path)


def _guarded(handler):
    """A route handler whose errors answer in the route's shape: APIError as itself, a bug as a plain 500."""
    async def endpoint(request: Request):
        try:
            return await handler(request)
        except APIError as e:
            return error_response(e, request.url.path, _request_id(request))
        except EngineStopped as e:       # the drain's grace ran out while this request was being answered
            return error_response(APIError(503, f"{e}; retry on another replica", headers={"Retry-After": "5"}),
                                  request.url.path, _request_id(request))
        except ClientDisconnect:         # the client hung up (mid-upload or mid-answer): not a server error
            log.info("client disconnected from %s; request %s aborted", request.url.path, _request_id(request))
            return Response(status_code=CLIENT_CLOSED)     # never reaches the client; counted as 499
        except Exception:  # noqa: BLE001 - a bug is a 500 in the route's shape, the trace stays in the log
            log.exception("unexpected error on %s", request.url.path)
            return error_response(APIError(500, "internal server error; the request was not completed"),
                                  request.url.path, _request_id(request))
    endpoint.__name__ = handler.__name__
    return endpoint


def _add_api_routes(app: FastAPI) -> None:
    app.add_api_route(OPENAI_CHAT, _guarded(openai_routes.chat_completions), methods=["POST"])
    app.add_api_route(COMPAT_CHAT, _guarded(openai_routes.chat_completions), methods=["POST"])
    app.add_api_route("/v1/models", _guarded(openai_routes.list_models), methods=["GET", "HEAD"])
    app.add_api_route("/compatible-mode/v1/models", _guarded(openai_routes.list_models), methods=["GET", "HEAD"])
    for prefix in MODEL_PREFIXES:                 # a Hub id holds a slash: the rest of the path is the id
        app.add_api_route(prefix + "{model:path}", _guarded(openai_routes.retrieve_model), methods=["GET", "HEAD"])
    app.add_api_route(DASHSCOPE_GEN, _guarded(dashscope_routes.generation), methods=["POST"])
    app.add_api_route(UPLOADS, _guarded(upload_routes.get_policy), methods=["GET"])
    app.add_api_route(UPLOADS, _guarded(upload_routes.upload), methods=["POST"])


def _add_service_routes(app: FastAPI, state: ServerState) -> None:
    """/openapi.json, /health and /metrics: outside the API prefixes, so no request counting; /metrics asks
    for the key itself (unless metrics_public)."""
    document = openapi_document("qwenvl", "1", {
        "openai_chat": OPENAI_CHAT, "compat_chat": COMPAT_CHAT, "dashscope": DASHSCOPE_GEN,
        "models": "/v1/models", "compat_models": "/compatible-mode/v1/models", "uploads": UPLOADS})

    @app.api_route("/openapi.json", include_in_schema=False, methods=["GET", "HEAD"])
    async def openapi_json():
        return JSONResponse(document)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        stalled_s = state.engine.stalled_for()
        if stalled_s > state.settings.health_stall_s:   # a stuck step: let the load balancer route around it
            return JSONResponse({"status": "stalled", "model": state.model_name,
                                 "reason": f"the engine has not stepped for {stalled_s:.0f} s while requests wait "
                                           f"(limit {state.settings.health_stall_s:g} s, --health-stall-timeout)"},
                                status_code=503)
        return {"status": "ok", "model": state.model_name, "uptime_s": round(time.time() - state.started, 1)}

    @app.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics_endpoint(request: Request):
        if not state.settings.metrics_public:    # request counts and queue depth are not for everyone
            try:
                check_api_key({k.lower(): v for k, v in request.headers.items()}, state.api_key)
            except APIError as e:
                return error_response(e, request.url.path)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def route_key(path: str) -> str:
    """The ROUTES key serving `path` ("other" when none): the path itself, or a templated one."""
    if path in ROUTES:
        return path
    for prefix in MODEL_PREFIXES:
        if path.startswith(prefix) and len(path) > len(prefix):
            return prefix + "{model}"
    return "other"


def _route_error(path: str, method: str) -> APIError | None:
    """404 for a path no API route serves, 405 (with Allow) for a method it does not take, else None."""
    methods = ROUTES.get(route_key(path))
    if methods is None:
        return APIError(404, f"no API route at {path[:200]}; see /openapi.json for the routes")
    if method not in methods:
        allowed = ", ".join(m for m in methods if m != "HEAD")
        return APIError(405, f"{path[:200]} does not take {method[:20]}; use {allowed}", headers={"Allow": allowed})
    return None


class _Gate:
    """Pure ASGI (no BaseHTTPMiddleware: it would buffer streams and hide client disconnects)."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path.startswith(API_PREFIXES) or path + "/" in API_PREFIXES):
            await self.app(scope, receive, send)
            return
        state = self.state
        route = route_key(path)
        scope["route_label"] = route
        request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        error = None
        if state.draining:
            error = APIError(503, "the server is shutting down; retry on another replica",
                             headers={"Retry-After": "5"})
        else:
            try:
                if not (path == UPLOADS and scope["method"] == "POST"):   # a form upload's credential is
                    check_api_key(headers, state.api_key)                 # its signed policy (uploads.py)
            except APIError as e:
                error = e
            else:
                error = _route_error(path, scope["method"])
        if error is not None:
            response = error_response(error, path, request_id if is_dashscope_path(path) else None)
            await response(scope, receive, send_wrapper)
            state.metrics.requests.labels(route, str(status["code"])).inc()
            return
        state.inflight += 1
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            state.inflight -= 1
            state.metrics.requests.labels(route, str(status["code"])).inc()
