"""`qwenvl serve`: argparse wiring and the uvicorn runner with a SIGTERM drain.

SIGTERM (or a first Ctrl-C): new API requests get 503 at once, in-flight ones get up to `drain_grace_s`
to finish, then uvicorn stops and the process exits 0. A second signal stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import time

from .access_log import AccessLog, ThroughputLog, TokenCounter
from .engine_factory import build_engine
from .settings import ServerSettings

log = logging.getLogger("qwenvl.server")


def add_serve_subcommand(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve the OpenAI- and DashScope-compatible HTTP APIs",
                              description="Serve one model over HTTP: OpenAI /v1/chat/completions, DashScope "
                              "multimodal-generation, /health, /metrics and the web UI at /.")
    p.add_argument("model_arg", nargs="?", default=None, metavar="MODEL",
                   help="checkpoint folder or Hugging Face Hub id, as `vllm serve MODEL` (the same as --model)")
    p.add_argument("--model", default=None, help="checkpoint folder or Hugging Face Hub id (default: the bundled "
                   "model); requests that leave out temperature/top_p/top_k/repetition_penalty get its "
                   "generation_config.json values")
    p.add_argument("--mmproj", default=None, metavar="FILE.gguf",
                   help="with a GGUF --model: its vision projector GGUF (llama.cpp's mmproj file)")
    p.add_argument("--revision", default=None, help="with a Hub id: branch, tag or commit (default: main)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port; a busy one fails at once, before the model loads")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $QWENVL_API_KEY)")
    p.add_argument("--served-model-name", default=None,
                   help="model id(s), comma-separated aliases, listed by /v1/models (others get 404)")
    p.add_argument("--metrics-public", action="store_true", help="serve /metrics without the API key")
    p.add_argument("--cors-origins", default="", help="comma list of browser origins sent CORS headers (default: none)")
    p.add_argument("--allowed-local-media-path", default=None, help="allow file:// image URLs under this folder")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="allow media URLs that resolve to loopback/private addresses (never link-local or "
                        "cloud metadata ones)")
    p.add_argument("--fetch-total-timeout", type=float, default=30.0,
                   help="seconds one remote image/video fetch may take in all (default: 30)")
    p.add_argument("--max-images", type=int, default=16, help="images per request")
    p.add_argument("--max-body-mb", type=float, default=50.0, help="request body limit in MB")
    p.add_argument("--max-queue", type=int, default=256, help="requests in flight before answering 429")
    p.add_argument("--max-image-pixels", type=int, default=8192 * 8192, help="pixels per image (from the header)")
    p.add_argument("--drain-grace", type=float, default=None,
                   help="seconds in-flight requests get on SIGTERM (default 30; 20 with --replicas, whose Ray "
                        "shutdown takes up to 10 more)")
    _add_structured_output_limits(p)
    _add_upload_args(p)
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bfloat16, or float32 "
                                                 "on a CPU without fast bfloat16 products)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU) | cpu | cuda | cuda:N")
    p.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache memory in GiB (default: 1.0)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--quantization", default=None, choices=("int8", "int4"),
                   help="weight-only quantisation of the language model at load (default: none, the checkpoint dtype)")
    p.add_argument("--quantize-vision", action="store_true",
                   help="with --quantization, the vision tower too (less memory, no speed-up)")
    p.add_argument("--max-prefill-tokens-while-decoding", type=int, default=None,
                   help="a step that decodes runs at most this many prompt tokens, so running streams keep a "
                        "steady pace while long prompts arrive (default: 64, 256 for a model under 64 MiB; "
                        "0: no cap)")
    p.add_argument("--vision-rows-per-step", type=int, default=None,
                   help="encode images ahead, at most this many patch rows x tower blocks per decoding step "
                        "(default: 1024, 8192 for a model under 64 MiB; 0: each image whole, in the step that "
                        "first needs it)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="split the language model over N processes, one GPU each (gloo on CPU; see README)")
    _add_replica_args(p)
    p.set_defaults(func=run_serve_command)
    return p


def _add_replica_args(p) -> None:
    g = p.add_argument_group("replicas (Ray Serve; pip install 'qwenvl[cluster]')")
    g.add_argument("--replicas", type=int, default=None,
                   help="run N engine replicas on Ray Serve behind this server (default: one engine in-process)")
    g.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (default: start a local one bound to 127.0.0.1)")
    g.add_argument("--ray-dashboard", action="store_true", help="local cluster: start the Ray dashboard on 127.0.0.1")
    g.add_argument("--cpus-per-replica", type=float, default=None,
                   help="Ray CPUs per replica (default: 1 with a GPU, else the cores shared out)")
    g.add_argument("--ray-object-store-mb", type=int, default=None,
                   help="local cluster: object store size (default: Ray's)")


def _add_upload_args(p) -> None:
    u = p.add_argument_group("the dashscope SDK's uploads of local files (GET/POST /api/v1/uploads, oss:// URLs)")
    u.add_argument("--upload-dir", default=None,
                   help="where the uploads are kept (default: a temporary folder, removed at exit)")
    u.add_argument("--upload-ttl", type=float, default=3600.0,
                   help="seconds an upload policy and an uploaded file stay valid (default: 3600)")
    u.add_argument("--upload-store-mb", type=float, default=1024.0,
                   help="MB all uploads may take on disk together; the oldest go first (default: 1024)")


def _add_structured_output_limits(p) -> None:
    s = p.add_argument_group("structured output limits (response_format json_schema, forced tool calls, OCR "
                             "key-information schemas; past one a request gets 400, past the deadline 503)")
    s.add_argument("--max-schema-bytes", type=int, default=64 * 1024,
                   help="a schema's size as compact JSON (default: 65536)")
    s.add_argument("--max-schema-properties", type=int, default=1000,
                   help="properties declared in one schema, all levels together (default: 1000)")
    s.add_argument("--max-schema-depth", type=int, default=32,
                   help="objects/arrays nested in one schema document (default: 32)")
    s.add_argument("--grammar-compile-timeout", type=float, default=10.0,
                   help="seconds a schema's grammar may take to compile; it compiles beside the running "
                        "requests, never stalling them (default: 10)")
    p.add_argument("--health-stall-timeout", type=float, default=60.0,
                   help="/health answers 503 when the engine has not stepped for this many seconds while "
                        "requests wait (default: 60)")


def settings_from_args(args) -> ServerSettings:
    return ServerSettings(
        model=model_from_args(args), revision=args.revision, host=args.host, port=args.port,
        api_key=args.api_key or os.environ.get("QWENVL_API_KEY") or None,
        served_model_name=args.served_model_name, dtype=args.dtype, device=args.device,
        allowed_local_media_path=args.allowed_local_media_path, allow_private_urls=args.allow_private_urls,
        max_images=args.max_images, max_body_mb=args.max_body_mb, max_queue=args.max_queue,
        max_image_pixels=args.max_image_pixels, drain_grace_s=_drain_grace(args),
        fetch_total_timeout_s=args.fetch_total_timeout, cors_origins=_comma_list(args.cors_origins),
        metrics_public=args.metrics_public, max_schema_bytes=args.max_schema_bytes,
        max_schema_properties=args.max_schema_properties, max_schema_depth=args.max_schema_depth,
        grammar_compile_timeout_s=args.grammar_compile_timeout, health_stall_s=args.health_stall_timeout,
        upload_dir=args.upload_dir, upload_ttl_s=args.upload_ttl, upload_store_mb=args.upload_store_mb)


def model_from_args(args) -> str | None:
    """MODEL or --model (one of them; both only when they agree)."""
    positional = getattr(args, "model_arg", None)
    if positional and args.model and positional != args.model:
        print(f"error: two models given, {positional!r} and --model {args.model!r}; give one", file=sys.stderr)
        raise SystemExit(2)
    return positional or args.model


def _drain_grace(args) -> float:
    if args.drain_grace is not None:
        return args.drain_grace
    replicas = getattr(args, "replicas", None) is not None or getattr(args, "ray_address", None) is not None
    return 20.0 if replicas else 30.0          # replicas: SIGTERM to exit stays within 30 s


def _comma_list(text: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def run_serve_command(args) -> int:
    engine_options = {}
    if getattr(args, "kv_cache_gb", None) is not None:
        engine_options["kv_cache_gb"] = args.kv_cache_gb
    if getattr(args, "max_model_len", None) is not None:
        engine_options["max_model_len"] = args.max_model_len
    if getattr(args, "mmproj", None) is not None:
        engine_options["mmproj"] = args.mmproj
    for name in ("max_prefill_tokens_while_decoding", "vision_rows_per_step"):
        if getattr(args, name, None) is not None:       # 0: no cap (the engine's None)
            engine_options[name] = getattr(args, name) or None
    if getattr(args, "quantization", None) is not None:
        engine_options["quantization"] = args.quantization
        engine_options["quantize_vision"] = bool(getattr(args, "quantize_vision", False))
    if getattr(args, "tensor_parallel_size", 1) != 1:
        engine_options["tensor_parallel_size"] = args.tensor_parallel_size
    if getattr(args, "replicas", None) is not None or getattr(args, "ray_address", None) is not None:
        from .replicas import ClusterOptions, serve_replicas

        cluster = ClusterOptions(replicas=args.replicas or 1, address=args.ray_address, dashboard=args.ray_dashboard,
                                 cpus_per_replica=args.cpus_per_replica, object_store_mb=args.ray_object_store_mb)
        return serve_replicas(settings_from_args(args), engine_options, cluster, serve_http=serve)
    return serve(settings_from_args(args), engine_options=engine_options, hard_exit=True)


def serve(settings: ServerSettings, engine_options: dict | None = None, async_engine=None,
          mount_ui=None, ready: threading.Event | None = None, extend_app=None, hard_exit: bool = False) -> int:
    """Load the model (unless an engine is given), serve until SIGTERM/SIGINT, drain, return 0.
    `extend_app(app)`, when given, is called on the finished app (replicas add their response header).
    `hard_exit` (the CLI): leave the process at once when a grammar compile still runs at the end."""
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:                                   # a busy port fails in a second, not after minutes of model loading
        sock = bind_socket(settings.host, settings.port)
    except OSError as e:
        print(f"error: cannot listen on {settings.host}:{settings.port}: {e.strerror or e} "
              "(choose another --port or --host)", file=sys.stderr)
        return 1
    async_engine = async_engine or build_engine(settings, engine_options)
    if mount_ui is None:
        mount_ui = _default_ui()
    counter = TokenCounter(async_engine)
    app = create_app(counter, settings, mount_ui=mount_ui or None)     # mount_ui=False: no UI
    if extend_app is not None:
        extend_app(app)
    state = app.state.qwenvl
    config = uvicorn.Config(AccessLog(app), host=settings.host, port=settings.port, log_level="info",
                            timeout_graceful_shutdown=5, access_log=False)
    server = _DrainingServer(config, state, settings.drain_grace_s, ready)
    log.info("%s", start_line(state, settings, _stats(async_engine), engine_options or {}, bool(mount_ui)))
    throughput = ThroughputLog(counter, async_engine.stats).start()
    try:
        server.run(sockets=[sock])
    finally:
        throughput.stop()
        sock.close()
    asyncio.run(async_engine.shutdown(grace_s=1.0))
    if hard_exit:
        _exit_if_compiling(async_engine)
    return 0


def _exit_if_compiling(async_engine) -> None:
    """A grammar compile cannot be interrupted, and the compiler's C++ teardown at interpreter exit waits for
    it or aborts the process (measured: 'terminate called', SIGABRT). Nothing of ours is left to clean up
    (the engine is shut down), so a process that still compiles leaves at once with status 0."""
    running = async_engine.compiles_running()
    if running:
        log.info("exiting while %d grammar compile(s) still run; their results are not needed", running)
        async_engine.stop_workers()            # tensor-parallel workers, which garbage collection would stop
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def start_line(state, settings: ServerSettings, stats: dict, engine_options: dict, ui: bool) -> str:
    """What is served, with which engine settings, where, and how to stop it: the line a user reads first."""
    info = state.info
    engine = [info.family, info.device, info.dtype] if info is not None else []
    if engine_options.get("quantization"):
        engine.append(f"{engine_options['quantization']} weights")
    if engine_options.get("tensor_parallel_size", 1) > 1:
        engine.append(f"{engine_options['tensor_parallel_size']} tensor-parallel workers")
    if state.max_model_len:
        engine.append(f"context {state.max_model_len} tokens")
    if stats.get("kv_blocks_total"):
        engine.append(f"KV cache {stats['kv_blocks_total']} blocks of {stats.get('kv_block_size', '?')} tokens")
    engine.append(f"queue {settings.max_queue}")
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"http://{host}:{settings.port}"
    names = ", ".join(state.model_names)
    routes = f"OpenAI {url}/v1, DashScope {url}/api/v1" + (f", web UI {url}/" if ui else "")
    return (f"serving {names} ({', '.join(engine)}) on {url}: {routes}; auth {'on' if state.api_key else 'off'}. "
            f"Ctrl-C or SIGTERM stops it (in-flight requests get {settings.drain_grace_s:.0f} s)")


def _stats(async_engine) -> dict:
    try:
        return async_engine.stats()
    except Exception:  # noqa: BLE001 - a replica that does not answer yet: the line goes without the KV figures
        return {}


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening address, taken before the model loads (uvicorn serves on this socket)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _default_ui():
    """The web UI's mount hook, when the web package provides one (it is optional)."""
    try:
        from ..web import mount_ui  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - no UI: the APIs still serve
        return None
    return mount_ui


def _wait_idle(state, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while state.inflight > 0 and time.monotonic() < deadline:
        time.sleep(0.05)


class _DrainingServer:
    """uvicorn.Server whose first SIGTERM/SIGINT drains instead of closing the socket at once."""

    def __new__(cls, config, state, grace_s: float, ready):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if state.draining:                 # a second signal: stop now
                    self.should_exit = True
                    self.force_exit = sig == signal.SIGINT
                    return
                state.draining = True
                log.info("signal %s: draining %d request(s) for up to %.0f s", sig, state.inflight, grace_s)
                threading.Thread(target=self._drain, daemon=True).start()

            def _drain(self):
                _wait_idle(state, grace_s)
                # Past the grace: end what is left (queued, compiling, generating) ourselves, so each gets a
                # JSON 503 (or an in-band error on a started stream), not uvicorn's plain-text 500 at exit.
                if state.inflight > 0:
                    log.info("drain: %d request(s) still in flight after %.0f s; ending them with 503",
                             state.engine.fail_all("the server is shutting down"), grace_s)
                    _wait_idle(state, 3.0)
                self.should_exit = True

            async def startup(self, sockets=None):
                await super().startup(sockets)
                if ready is not None:
                    ready.set()

        return Server(config)
