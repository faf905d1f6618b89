"""Server settings: one frozen dataclass, filled from the command line or by tests."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..structured.limits import SchemaLimits


@dataclass(frozen=True)
class ServerSettings:
    model: str | None = None                   # checkpoint folder or Hub id; None = the bundled model
    revision: str | None = None                # with a Hub id: branch, tag or commit
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None                 # None: no auth (QWENVL_API_KEY is read by from_env/cli)
    served_model_name: str | None = None       # what /v1/models lists, comma-separated aliases; default: the
                                               # engine's model name. A request naming another model gets 404
    metrics_public: bool = False                   # /metrics without the API key (it needs it when one is set)
    cors_origins: tuple[str, ...] = ()             # browser origins sent CORS headers; none by default
    dtype: str | None = None
    device: str = "auto"
    # media
    allowed_local_media_path: str | None = None    # file:// URLs only under this folder
    allow_private_urls: bool = False               # allow http(s) URLs resolving to private/loopback/...
    fetch_connect_timeout_s: float = 5.0
    fetch_read_timeout_s: float = 15.0
    fetch_total_timeout_s: float = 30.0            # per fetched URL, redirects included (a trickling host)
    max_image_bytes: int = 20 * 1024 * 1024        # per fetched image / data URL payload
    max_video_bytes: int = 64 * 1024 * 1024        # per fetched video file / data URL payload
    max_redirects: int = 3
    # the dashscope SDK's uploads of local files (server/uploads.py)
    upload_dir: str | None = None                  # where they are kept; None: a temporary folder, removed at exit
    upload_ttl_s: float = 3600.0                   # how long an upload policy and an uploaded file stay valid
    upload_store_mb: float = 1024.0                # all uploads together; the oldest are evicted past it
    upload_concurrency: int = 8                    # uploads arriving at once; 429 past it
    # limits
    max_body_mb: float = 50.0
    max_images: int = 16                           # images per request
    max_video_frames: int = 256                    # frames per request (all frame-list videos), and the most
                                                   # frames sampled from one video file
    max_image_pixels: int = 8192 * 8192            # per image, checked from the header before decoding
    max_queue: int = 256                           # requests in flight before 429
    retry_after_s: int = 1
    drain_grace_s: float = 30.0                    # SIGTERM: time given to in-flight requests
    default_max_tokens: int = 2048                 # when a request gives none (clamped to the context)
    # structured output (response_format json_schema, forced tool calls, OCR key-information schemas)
    max_schema_bytes: int = SchemaLimits.max_bytes
    max_schema_properties: int = SchemaLimits.max_properties
    max_schema_depth: int = SchemaLimits.max_depth
    grammar_compile_timeout_s: float = SchemaLimits.compile_timeout_s
    health_stall_s: float = 60.0                   # /health is 503 when the engine has not stepped this long
                                                   # while requests wait on it

    @property
    def schema_limits(self) -> SchemaLimits:
        return SchemaLimits(self.max_schema_bytes, self.max_schema_properties, self.max_schema_depth,
                            self.grammar_compile_timeout_s)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def served_model_names(self) -> tuple[str, ...]:
        return tuple(n.strip() for n in (self.served_model_name or "").split(",") if n.strip())

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get("QWENVL_API_KEY") or None
