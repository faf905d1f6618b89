"""Server behaviour that needs control over the engine: a full queue, a client that disconnects, an
unexpected exception, the SIGTERM drain. A small fake AsyncEngine stands in for the real one; the server
is the real uvicorn on a loopback port. Also home of `run_server`, used by the other server tests."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import uvicorn

from qwenvl.engine.errors import EngineFull
from qwenvl.engine.info import EngineInfo
from qwenvl.answers.outputs import RequestOutput
from qwenvl.server.app import create_app
from qwenvl.server.settings import ServerSettings

DS_PATH = "/api/v1/services/aigc/multimodal-generation/generation"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class run_server:
    """Context manager: uvicorn serving `app` in a thread; yields the base URL."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


class FakeAsyncEngine:
    """The AsyncEngine contract, scripted: emits `pieces` one per `delay` seconds."""

    def __init__(self, pieces=("Hello", " world", "!"), delay=0.0, queue_full=False, fail_prepare=None,
                 max_model_len=1000, boxes=None):
        self._info = EngineInfo(model_name="fake-model", max_model_len=max_model_len, device="cpu",
                                dtype="float32")
        self.pieces, self.delay, self.queue_full = list(pieces), delay, queue_full
        self.fail_prepare = fail_prepare
        self.boxes = boxes if boxes is not None else [{"label": "cat", "x1": 1, "y1": 2, "x2": 3, "y2": 4,
                                                      "image_index": 0}]
        self.aborted: list[str] = []
        self.closed: list[str] = []
        self.finished: list[str] = []
        self.template_kwargs: list = []          # chat_template_kwargs of each prepare()

    def info(self):
        return self._info

    async def prepare(self, messages, chat_template_kwargs=None, tools=None):
        self.template_kwargs.append(chat_template_kwargs)
        if self.fail_prepare is not None:
            raise self.fail_prepare
        return SimpleNamespace(token_ids=[1] * 10, vision=[], reasoning_opened=False)

    async def generate(self, prompt, params, request_id):
        if self.queue_full:
            raise EngineFull("1 requests in flight (limit 1)")
        text, n = "", min(len(self.pieces), params.max_tokens)
        try:
            for i in range(n):
                await asyncio.sleep(self.delay)
                text += self.pieces[i]
                last = i == n - 1
                yield RequestOutput(request_id, text=text, delta_text=self.pieces[i], token_ids=list(range(i + 1)),
                                    finish_reason=("stop" if n == len(self.pieces) else "length") if last else None,
                                    boxes=self.boxes if last else [], prompt_tokens=10, image_tokens=4)
            self.finished.append(request_id)
        finally:
            self.closed.append(request_id)

    def stalled_for(self):          # AsyncEngine's contract: a fake never stalls, compiles or holds workers
        return 0.0

    def fail_all(self, reason="the server is shutting down"):
        return 0

    def compiles_running(self):
        return 0

    def stop_workers(self):
        pass

    def abort(self, request_id):
        self.aborted.append(request_id)

    def stats(self):
        return {"kv_blocks_total": 100, "kv_blocks_used": 7, "num_waiting": 2, "prefix_cache_hit_tokens": 30,
                "prefix_cache_queried_tokens": 120, "encoder_cache_hits": 1, "encoder_cache_misses": 3}

    async def shutdown(self, grace_s=30.0):
        pass


HI = [{"role": "user", "content": "hi"}]


def _chat(stream=False):
    return {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def test_queue_full_is_429_with_retry_after_in_each_shape():
    with run_server(create_app(FakeAsyncEngine(queue_full=True), ServerSettings())) as url:
        r = httpx.post(url + "/v1/chat/completions", json=_chat())
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        r = httpx.post(url + DS_PATH, json={"model": "fake-model", "input": {"messages": HI}},
                       headers={"X-DashScope-SSE": "enable"})
        assert r.status_code == 429 and "retry-after" in r.headers
        assert r.json()["code"] == "Throttling" and r.json()["request_id"]


def test_unexpected_exception_is_500_without_trace():
    engine = FakeAsyncEngine(fail_prepare=RuntimeError("secret internals at line 42"))
    with run_server(create_app(engine, ServerSettings())) as url:
        r = httpx.post(url + "/v1/chat/completions", json=_chat())
        assert r.status_code == 500
        err = r.json()["error"]
        assert set(err) >= {"message", "type", "code"} and "secret" not in r.text and "Traceback" not in r.text
        r = httpx.post(url + DS_PATH, json={"model": "fake-model", "input": {"messages": HI}})
        assert r.status_code == 500 and set(r.json()) == {"code", "message", "request_id"}
        assert "secret" not in r.text


def test_client_disconnect_mid_stream_aborts_the_request():
    engine = FakeAsyncEngine(pieces=["tok"] * 200, delay=0.02)
    with run_server(create_app(engine, ServerSettings())) as url:
        with httpx.Client() as client:
            with client.stream("POST", url + "/v1/chat/completions", json=_chat(stream=True)) as r:
                lines = r.iter_lines()
                got = [next(lines) for _ in range(4)]
                assert got[0].startswith("data: ")
        deadline = time.time() + 5
        while not engine.closed and time.time() < deadline:
            time.sleep(0.02)
        assert engine.closed and not engine.finished          # the generator was closed early
        assert engine.aborted == engine.closed


def test_non_streaming_disconnect_aborts_too():
    engine = FakeAsyncEngine(pieces=["tok"] * 200, delay=0.02)
    with run_server(create_app(engine, ServerSettings())) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=_chat(), timeout=0.3)
        deadline = time.time() + 5
        while not engine.aborted and time.time() < deadline:
            time.sleep(0.02)
        assert engine.aborted and not engine.finished


def test_boxes_and_metrics_with_fake_engine():
    with run_server(create_app(FakeAsyncEngine(), ServerSettings(api_key="k"))) as url:
        h = {"Authorization": "Bearer k"}
        r = httpx.post(url + "/v1/chat/completions", json=_chat(), headers=h).json()
        assert r["choices"][0]["message"]["boxes"][0]["label"] == "cat"
        assert r["choices"][0]["message"]["content"] == "Hello world!"
        r = httpx.post(url + DS_PATH, json={"model": "fake-model", "input": {"messages": [{"role": "user", "content": [
            {"text": "hi"}]}]}}, headers=h).json()
        assert r["output"]["choices"][0]["message"]["boxes"][0]["x2"] == 3
        assert r["usage"]["input_tokens_details"] == {"image_tokens": 4, "text_tokens": 6}
        lines = [ln for ln in httpx.post(url + "/v1/chat/completions", json=_chat(True), headers=h).text.split("\n")
                 if ln.startswith("data: {")]
        last = json.loads(lines[-1][6:])["choices"][0]
        assert last["finish_reason"] == "stop" and last["delta"]["boxes"][0]["label"] == "cat"
        assert last["message"]["boxes"] == last["delta"]["boxes"]
        raw = httpx.post(url + DS_PATH, json={"model": "fake-model", "input": {"messages": HI},
                                              "parameters": {"incremental_output": True}},
                         headers={**h, "X-DashScope-SSE": "enable"}).text
        events = [json.loads(f.split("\ndata:", 1)[1]) for f in raw.split("\n\n") if f.strip()]
        assert [e["output"]["choices"][0]["message"]["content"][0]["text"] for e in events] == ["Hello", " world", "!"]
        assert [e["output"]["choices"][0]["finish_reason"] for e in events] == ["null", "null", "stop"]
        assert "boxes" not in events[0]["output"]["choices"][0]["message"]
        assert events[-1]["output"]["choices"][0]["message"]["boxes"][0]["label"] == "cat"
        m = httpx.get(url + "/metrics", headers=h).text
        assert 'qwenvl_http_requests_total{route="/v1/chat/completions",status="200"} 2.0' in m
        assert "qwenvl_engine_kv_blocks_used 7.0" in m and "qwenvl_queue_depth 2.0" in m
        assert "qwenvl_prefix_cache_hit_rate 0.25" in m and "qwenvl_encoder_cache_hit_rate 0.25" in m
        assert "qwenvl_time_to_first_token_seconds_count" in m and "qwenvl_request_latency_seconds_count" in m


_DRAIN_SCRIPT = textwrap.dedent("""
    import sys, threading
    sys.path.insert(0, {tests!r})
    from test_server_fake_engine import FakeAsyncEngine
    from qwenvl.server.cli import serve
    from qwenvl.server.settings import ServerSettings
    ready = threading.Event()
    threading.Thread(target=lambda: (ready.wait(), print("READY", flush=True)), daemon=True).start()
    sys.exit(serve(ServerSettings(port={port}, drain_grace_s=10), async_engine=FakeAsyncEngine(
        pieces=["x"] * 40, delay=0.05), mount_ui=False, ready=ready))
""")


def test_sigterm_drains_in_flight_requests_and_exits_0():
    port = free_port()
    script = _DRAIN_SCRIPT.format(tests=str(Path(__file__).parent), port=port)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        before_ready = []
        for line in proc.stdout:
            if "READY" in line:
                break
            before_ready.append(line)
        assert any(f"on http://127.0.0.1:{port}:" in ln and "Ctrl-C or SIGTERM stops it" in ln for ln in before_ready)
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=20) as client:
            with client.stream("POST", url + "/v1/chat/completions", json=_chat(stream=True)) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.3)
                refused = httpx.post(url + "/v1/chat/completions", json=_chat())
                assert refused.status_code == 503 and refused.json()["error"]["code"] == "service_unavailable"
                rest = [ln for ln in lines if ln]
            assert rest[-1] == "data: [DONE]"
            text = "".join(json.loads(ln[6:])["choices"][0]["delta"].get("content", "")
                           for ln in rest[:-1] if json.loads(ln[6:])["choices"])
            assert text.count("x") >= 35                      # the in-flight request ran to the end
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


class _SlowStart(FakeAsyncEngine):
    async def generate(self, prompt, params, request_id):
        try:
            await asyncio.sleep(30)                           # waiting in the queue
            yield RequestOutput(request_id, text="late", finish_reason="stop")
        finally:
            self.closed.append(request_id)


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_while_queued_aborts(stream):
    engine = _SlowStart()
    with run_server(create_app(engine, ServerSettings())) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=_chat(stream), timeout=0.3)
        deadline = time.time() + 5
        while not engine.aborted and time.time() < deadline:
            time.sleep(0.02)
        assert engine.aborted and engine.closed


def test_serve_subcommand_flags(monkeypatch):
    import argparse

    from qwenvl.server.cli import add_serve_subcommand, settings_from_args

    parser = argparse.ArgumentParser()
    add_serve_subcommand(parser.add_subparsers(dest="command"))
    monkeypatch.setenv("QWENVL_API_KEY", "from-env")
    args = parser.parse_args(["serve", "--port", "9001", "--allow-private-urls", "--max-images", "3",
                              "--max-body-mb", "2", "--max-queue", "5", "--allowed-local-media-path", "/tmp",
                              "--fetch-total-timeout", "7", "--cors-origins", "https://a.example, https://b.example",
                              "--metrics-public"])
    s = settings_from_args(args)
    assert (s.host, s.port, s.api_key, s.allow_private_urls, s.max_images, s.max_queue) == \
        ("127.0.0.1", 9001, "from-env", True, 3, 5)
    assert s.max_body_bytes == 2 * 1024 * 1024 and s.allowed_local_media_path == "/tmp" and callable(args.func)
    assert s.fetch_total_timeout_s == 7 and s.metrics_public
    assert s.cors_origins == ("https://a.example", "https://b.example")
    assert s.model is None
    assert settings_from_args(parser.parse_args(["serve", "some/folder"])).model == "some/folder"    # as vllm serve
    assert settings_from_args(parser.parse_args(["serve", "--model", "a", "a"])).model == "a"
    with pytest.raises(SystemExit):
        settings_from_args(parser.parse_args(["serve", "a", "--model", "b"]))


def test_the_start_line_names_the_engine_where_and_how_to_stop():
    from qwenvl.server.cli import start_line

    state = create_app(FakeAsyncEngine(), ServerSettings(api_key="k", served_model_name="qwenvl,qwen-vl")).state.qwenvl
    line = start_line(state, ServerSettings(port=8123, max_queue=9, drain_grace_s=30),
                      {"kv_blocks_total": 512, "kv_block_size": 16}, {"quantization": "int8",
                                                                      "tensor_parallel_size": 2}, ui=True)
    assert line == ("serving qwenvl, qwen-vl (qwen2_vl, cpu, float32, int8 weights, 2 tensor-parallel workers, "
                    "context 1000 tokens, KV cache 512 blocks of 16 tokens, queue 9) on http://127.0.0.1:8123: "
                    "OpenAI http://127.0.0.1:8123/v1, DashScope http://127.0.0.1:8123/api/v1, web UI "
                    "http://127.0.0.1:8123/; auth on. Ctrl-C or SIGTERM stops it (in-flight requests get 30 s)")


THINKING = ("<think>", "Two red", " squares.\n", "</think>", "\n\nThere are", " two.")


def test_reasoning_content_split_on_both_apis_whole_and_streamed():
    engine = FakeAsyncEngine(pieces=THINKING)
    with run_server(create_app(engine, ServerSettings())) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        msgs = [{"role": "user", "content": "How many?"}]
        r = client.chat.completions.create(model="fake-model", messages=msgs, max_tokens=50,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": True}})
        message = r.choices[0].message
        assert message.content == "There are two." and message.model_extra["reasoning_content"] == "Two red squares."
        chunks = list(client.chat.completions.create(model="fake-model", messages=msgs, max_tokens=50, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "Two red squares."
        assert "".join(d.content or "" for d in deltas) == "There are two."
        ds = httpx.post(url + DS_PATH, json={"input": {"messages": msgs},
                                             "parameters": {"enable_thinking": False, "max_tokens": 50}}).json()
        ds_message = ds["output"]["choices"][0]["message"]
        assert ds_message["reasoning_content"] == "Two red squares." and ds_message["content"] == [{"text": "There are two."}]
    assert engine.template_kwargs[:3] == [{"enable_thinking": True}, None, {"enable_thinking": False}]


class _Records(logging.Handler):
    """Every record the server's and uvicorn's loggers emit while a test runs."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def __enter__(self):
        self.levels = {}
        for name in ("qwenvl.server", "uvicorn.error", "uvicorn"):
            self.levels[name] = logging.getLogger(name).level
            logging.getLogger(name).setLevel(logging.INFO)
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc):
        for name, level in self.levels.items():
            logging.getLogger(name).removeHandler(self)
            logging.getLogger(name).setLevel(level)


def _wait_for(predicate, timeout=5.0):
    deadline = time.time() + timeout
    while not predicate() and time.time() < deadline:
        time.sleep(0.02)
    return predicate()


def test_client_hangup_is_499_not_a_logged_500():
    engine = FakeAsyncEngine(pieces=["tok"] * 200, delay=0.02)
    with _Records() as logs, run_server(create_app(engine, ServerSettings())) as url:
        with pytest.raises(httpx.ReadTimeout):                # abandoned mid-answer
            httpx.post(url + "/v1/chat/completions", json=_chat(), timeout=0.3)
        assert _wait_for(lambda: engine.aborted)
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:   # abandoned mid-upload
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 5000\r\n\r\n{\"messages\": [")
            time.sleep(0.2)
        route = 'qwenvl_http_requests_total{route="/v1/chat/completions",status="499"} 2.0'
        assert _wait_for(lambda: route in httpx.get(url + "/metrics").text), httpx.get(url + "/metrics").text
        assert 'status="500"' not in httpx.get(url + "/metrics").text
    assert not [r for r in logs.records if r.exc_info or r.levelno >= logging.ERROR]
    assert sum("disconnected" in r.getMessage() for r in logs.records) == 2


def test_json_routes_want_application_json_in_each_shape():
    with run_server(create_app(FakeAsyncEngine(), ServerSettings())) as url:
        body = json.dumps(_chat()).encode()
        r = httpx.post(url + "/v1/chat/completions", content=body, headers={"Content-Type": "text/plain"})
        assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "unsupported_media_type"
        r = httpx.post(url + DS_PATH, content=json.dumps({"input": {"messages": [{"role": "user", "content": "hi"}]}}))
        assert r.status_code == 415 and set(r.json()) == {"code", "message", "request_id"}
        r = httpx.post(url + "/compatible-mode/v1/chat/completions", content=body,
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 415 and "error" in r.json()
        r = httpx.post(url + "/v1/chat/completions", content=body,
                       headers={"Content-Type": "application/json; charset=utf-8"})
        assert r.status_code == 200, r.text


def test_cors_headers_only_for_allowed_origins():
    origin = {"Origin": "https://app.example"}
    with run_server(create_app(FakeAsyncEngine(), ServerSettings())) as url:            # none by default
        assert "access-control-allow-origin" not in httpx.get(url + "/v1/models", headers=origin).headers
        r = httpx.options(url + "/v1/chat/completions", headers={**origin, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in r.headers
    settings = ServerSettings(api_key="k", cors_origins=("https://app.example",))
    with run_server(create_app(FakeAsyncEngine(), settings)) as url:
        r = httpx.get(url + "/v1/models", headers={**origin, "Authorization": "Bearer k"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = httpx.options(url + "/v1/chat/completions", headers={
            **origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = httpx.get(url + "/v1/models", headers={"Origin": "https://evil.example", "Authorization": "Bearer k"})
        assert "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("with_ui", [False, True])
def test_wrong_path_or_method_answers_in_the_api_family_shape(with_ui):
    from starlette.responses import PlainTextResponse

    async def catch_all(scope, receive, send):          # a UI mounted at "/" (as Gradio is) sees every path
        await PlainTextResponse("ui page")(scope, receive, send)
    mount = (lambda app: app.mount("/", catch_all)) if with_ui else None
    with run_server(create_app(FakeAsyncEngine(), ServerSettings(), mount_ui=mount)) as url:
        for path in ("/v1/nope", "/compatible-mode/v1/nope", "/v1"):
            r = httpx.get(url + path)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (path, r.text)
        r = httpx.post(url + "/api/v1/services/nope", json={})
        assert r.status_code == 404 and set(r.json()) == {"code", "message", "request_id"}
        assert r.json()["code"] == "NotFound"
        r = httpx.get(url + "/v1/chat/completions")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert r.json()["error"]["code"] == "method_not_allowed"
        r = httpx.post(url + "/v1/models", json={})
        assert r.status_code == 405 and r.headers["allow"] == "GET" and "error" in r.json()
        r = httpx.delete(url + DS_PATH)
        assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["code"] == "MethodNotAllowed"
        assert 'route="other",status="404"' in httpx.get(url + "/metrics").text


def test_metrics_need_the_api_key_unless_public():
    with run_server(create_app(FakeAsyncEngine(), ServerSettings(api_key="k"))) as url:
        r = httpx.get(url + "/metrics")
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = httpx.get(url + "/metrics", headers={"Authorization": "Bearer k"})
        assert r.status_code == 200 and "qwenvl_http_requests_total" in r.text
        assert httpx.get(url + "/health").status_code == 200                  # liveness stays open
    with run_server(create_app(FakeAsyncEngine(), ServerSettings(api_key="k", metrics_public=True))) as url:
        assert httpx.get(url + "/metrics").status_code == 200


def test_unknown_model_is_404_and_served_names_are_aliases():
    hi = [{"role": "user", "content": "hi"}]
    with run_server(create_app(FakeAsyncEngine(), ServerSettings(served_model_name="qwen-vl-plus, qwenvl"))) as url:
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["qwen-vl-plus", "qwenvl"]
        for name in ("qwen-vl-plus", "qwenvl", None):
            body = {"messages": hi} if name is None else {"model": name, "messages": hi}
            r = httpx.post(url + "/v1/chat/completions", json=body)
            assert r.status_code == 200 and r.json()["model"] == (name or "qwen-vl-plus"), r.text
        r = httpx.post(url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": hi})
        err = r.json()["error"]
        assert r.status_code == 404 and err["code"] == "model_not_found" and err["param"] == "model"
        assert "gpt-4o" in err["message"] and "qwen-vl-plus" in err["message"]
        r = httpx.post(url + DS_PATH, json={"model": "qwen-max", "input": {"messages": hi}})
        assert r.status_code == 404 and r.json()["code"] == "ModelNotFound" and "qwen-max" in r.json()["message"]
        assert httpx.post(url + DS_PATH, json={"model": "qwenvl", "input": {"messages": hi}}).status_code == 200
    with run_server(create_app(FakeAsyncEngine(), ServerSettings())) as url:      # default: the engine's name
        assert httpx.post(url + "/v1/chat/completions", json={"model": "fake-model", "messages": hi}).status_code == 200
        assert httpx.post(url + "/v1/chat/completions", json={"model": "other", "messages": hi}).status_code == 404


@pytest.mark.parametrize("api_key", [None, "k"])
def test_openapi_json_is_the_apis_own_with_the_web_demo_mounted(api_key):
    pytest.importorskip("gradio")
    from qwenvl.web.app import mount

    with run_server(create_app(FakeAsyncEngine(), ServerSettings(api_key=api_key), mount_ui=mount)) as url:
        assert httpx.get(url + "/").status_code == (200 if api_key is None else 401)     # the demo is there
        r = httpx.get(url + "/openapi.json")
        assert r.status_code == 200, r.text[:300]
        doc = r.json()
        assert doc["openapi"] == "3.1.0" and doc["info"]["title"] == "qwenvl"
        assert {"/v1/chat/completions", DS_PATH, "/v1/models"} <= set(doc["paths"])
        assert not any("gradio" in p or p.startswith("/gradio_api") for p in doc["paths"])
