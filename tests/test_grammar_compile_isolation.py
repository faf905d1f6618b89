"""One request's schema must never stall the others (issue 38, section 1).

The real server on a tiny random checkpoint, the official `openai` SDK as the client. The compiler is
slowed by a hook (schemas titled "slow:<seconds>" sleep before compiling), so the timings do not depend on
how fast this machine compiles a real large schema."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from qwenvl.engine.async_engine import AsyncEngine
from qwenvl.engine.llm_engine import EngineConfig, LLMEngine
from qwenvl.server.app import create_app
from qwenvl.server.settings import ServerSettings
from test_server_fake_engine import DS_PATH, free_port, run_server

MODEL = "qwenvl-test"
DEADLINE_S = 6.0               # the compile deadline here: the hook's delays below stay well clear of it
ASK = [{"role": "user", "content": "Answer in JSON."}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}},
          "required": ["name"], "additionalProperties": False}


def slow(seconds: float, schema: dict = PERSON) -> dict:
    return {**schema, "title": f"slow:{seconds}"}


def _delaying(compile_fn, started: list):
    def compile_grammar(spec):
        title = json.loads(spec.schema_json or "{}").get("title", "") if spec.schema_json else ""
        if title.startswith("slow:"):
            started.append(time.monotonic())
            time.sleep(float(title[5:]))
        return compile_fn(spec)
    return compile_grammar


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    engine = LLMEngine(tiny_checkpoint("qwen3_vl"), dtype="float32",
                       config=EngineConfig(kv_cache_gb=0.05, max_model_len=1024))
    started: list[float] = []
    engine.compile_grammar = _delaying(engine.compile_grammar, started)    # the test hook
    async_engine = AsyncEngine(engine, max_queue=32, grammar_timeout_s=DEADLINE_S)
    settings = ServerSettings(served_model_name=MODEL, grammar_compile_timeout_s=DEADLINE_S, health_stall_s=0.5)
    with run_server(create_app(async_engine, settings)) as base:
        yield base, async_engine, started
    asyncio.run(async_engine.shutdown(grace_s=1))


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=60)


def schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def _error(exc) -> dict:
    return exc.response.json()["error"]


def _wait_compiles_done(async_engine, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while async_engine.grammars.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not async_engine.grammars.running, "a compile never ended"


def _png() -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), "white").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


# --------------------------------------------------------------------------------------------- limits
@pytest.mark.parametrize("schema, limit", [
    ({"type": "object", "description": "x" * 70_000}, "--max-schema-bytes"),
    ({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(1001)}}, "--max-schema-properties"),
    (_nested(20), "--max-schema-depth"),
])
def test_a_schema_over_each_limit_is_a_400_naming_it(client, schema, limit):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5,
                                       response_format=schema_format(schema))
    err = _error(e.value)
    assert limit in err["message"] and err["param"] == "response_format.json_schema.schema", err


def test_limits_cover_forced_tool_calls_and_dashscope_ocr_schemas(server, client):
    big = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(1001)}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": big}}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, tools=tools, tool_choice="required")
    assert "--max-schema-properties" in _error(e.value)["message"]
    assert _error(e.value)["param"] == "tools[0].function.parameters"
    half = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(600)}}
    tools = [{"type": "function", "function": {"name": n, "parameters": half}} for n in ("f", "g")]
    with pytest.raises(openai.BadRequestError) as e:     # each is fine, the forced call's grammar is not
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, tools=tools, tool_choice="required")
    assert "--max-schema-properties" in _error(e.value)["message"] and _error(e.value)["param"] == "tools"
    body = {"model": MODEL, "input": {"messages": [{"role": "user", "content": [{"image": _png()}, {"text": "read"}]}]},
            "parameters": {"ocr_options": {"task": "key_information_extraction",
                                           "task_config": {"result_schema": {f"k{i}": "v" for i in range(1001)}}}}}
    r = httpx.post(server[0] + DS_PATH, json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "InvalidParameter" and "--max-schema-properties" in r.json()["message"]
    assert r.json()["request_id"]


def test_a_compile_past_the_deadline_is_a_503_naming_it(server, client):
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5,
                                       response_format=schema_format(slow(DEADLINE_S + 1.5)))
    assert e.value.status_code == 503
    err = _error(e.value)
    assert err["code"] == "grammar_compile_timeout" and "--grammar-compile-timeout" in err["message"], err
    _wait_compiles_done(server[1])                         # the late compile ends and is dropped
    assert server[1].stats()["kv_blocks_used"] == 0 and server[1].num_active == 0


# ------------------------------------------------------------------------------------ no stall
def test_plain_requests_are_served_while_a_schema_compiles(server, client):
    base, async_engine, started = server
    _wait_compiles_done(async_engine)                  # nothing left over from another test
    with ThreadPoolExecutor(9) as pool:
        n = len(started)
        structured = pool.submit(client.chat.completions.create, model=MODEL, messages=ASK, max_tokens=20,
                                 seed=1, response_format=schema_format(slow(3)))
        deadline = time.monotonic() + 10
        while len(started) == n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(started) > n, "the slow compile never started"

        def plain(i):
            t0 = time.monotonic()
            r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}],
                                               max_tokens=4, seed=i)
            return time.monotonic() - t0, r
        plains = [pool.submit(plain, i) for i in range(8)]
        latencies = [f.result()[0] for f in plains]
        during = async_engine.grammars.running
        answer = structured.result()
    assert all(f.result()[1].choices[0].finish_reason in ("stop", "length") for f in plains)
    assert during == 1, "the plain requests finished after the compile: they waited for it"
    assert max(latencies) < 2.0, latencies            # an unstalled tiny model answers in well under a second
    json.loads(answer.choices[0].message.content) if answer.choices[0].finish_reason == "stop" else None


def test_a_client_that_leaves_mid_compile_leaves_nothing_held(server):
    base, async_engine, started = server
    _wait_compiles_done(async_engine)
    warm = httpx.post(base + "/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 3,
                                                           "response_format": schema_format(PERSON)}, timeout=30)
    assert warm.status_code == 200                     # the compile threads exist now
    threads = threading.active_count()
    n = len(started)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + "/v1/chat/completions", timeout=1.5,
                   json={"model": MODEL, "messages": ASK, "max_tokens": 50, "response_format": schema_format(slow(3))})
    assert len(started) == n + 1                       # it was compiling when the client left
    time.sleep(0.3)
    assert async_engine.num_active == 0                # the request is gone while its compile still runs
    assert async_engine.grammars.running == 1
    _wait_compiles_done(async_engine)                  # the compile ends; its grammar is dropped
    stats = async_engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["num_waiting"] == 0 and stats["num_running"] == 0
    assert async_engine.grammars.running == 0 and threading.active_count() == threads


def test_health_is_503_while_the_engine_has_not_stepped_with_work_waiting(server, client):
    base, async_engine, _ = server
    engine = async_engine.engine
    real_step = engine.step

    def stuck_step():
        engine.step = real_step
        time.sleep(1.5)                                # one step stuck (a hung device, say)
        return real_step()
    assert httpx.get(base + "/health").status_code == 200
    engine.step = stuck_step
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(client.chat.completions.create, model=MODEL, messages=ASK, max_tokens=3)
        seen = set()
        while not answer.done():
            r = httpx.get(base + "/health")
            seen.add(r.status_code)
            if r.status_code == 503:
                assert r.json()["status"] == "stalled" and "--health-stall-timeout" in r.json()["reason"]
            time.sleep(0.1)
        answer.result()
    assert 503 in seen
    assert httpx.get(base + "/health").status_code == 200


# ------------------------------------------------------------------------------------- shutdown
def _big_schema(n: int) -> dict:
    """n optional integer properties: a real schema whose compile takes seconds to minutes (about cubic)."""
    return {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(n)}}


def _compiles(url: str) -> int:
    """Compiles running or queued, from /metrics (the engine's stats as gauges)."""
    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(int(float(line.split()[-1])) for line in text.splitlines()
               if line.startswith(("qwenvl_engine_grammar_compiles_running ", "qwenvl_engine_grammar_compiles_queued ")))


def test_sigterm_during_a_compile_exits_within_the_drain_with_json_503s():
    port = free_port()
    grace = 2.0
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwenvl", "serve", "--port", str(port), "--device", "cpu", "--drain-grace", str(grace),
         "--served-model-name", MODEL, "--max-schema-properties", "5000", "--max-schema-bytes", "300000",
         "--grammar-compile-timeout", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        ds_body = {"model": MODEL, "input": {"messages": [{"role": "user", "content": [{"text": "hi"}]}]},
                   "parameters": {"response_format": schema_format(_big_schema(2501))}}
        with ThreadPoolExecutor(2) as pool:
            openai_call = pool.submit(client.chat.completions.create, model=MODEL, messages=ASK, max_tokens=5,
                                      response_format=schema_format(_big_schema(2500)))
            ds_call = pool.submit(httpx.post, url + DS_PATH, json=ds_body, timeout=60)
            deadline = time.monotonic() + 60                 # both parsed and at the compiler (minutes of work)
            while _compiles(url) < 2:
                assert time.monotonic() < deadline and not openai_call.done() and not ds_call.done()
                time.sleep(0.1)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
            took = time.monotonic() - t0
            with pytest.raises(openai.APIStatusError) as e:
                openai_call.result()
            ds = ds_call.result()
        # the drain's grace, then uvicorn's and the engine's own stops: seconds on an idle machine, a few
        # more on a loaded shared one
        assert code == 0 and took < grace + 8, (code, took, proc.stdout.read()[-3000:])
        assert e.value.status_code == 503 and _error(e.value)["code"] == "service_unavailable", e.value.response.text
        assert ds.status_code == 503 and ds.json()["code"] == "ServiceUnavailable" and ds.json()["request_id"], ds.text
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.stdout.read()
    assert "Traceback" not in output, output[-3000:]


def test_a_compiler_error_is_a_400_without_the_compilers_internals(client):
    bad = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 10 ** 20}}, "required": ["n"]}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, response_format=schema_format(bad))
    err = _error(e.value)
    assert err["param"] == "response_format.json_schema.schema" and "exceeds maximum" in err["message"], err
    assert ".cc" not in err["message"] and not re.search(r"\[\d\d:\d\d:\d\d\]", err["message"]), err


def test_the_limits_are_flags_of_qwenvl_serve():
    import argparse

    from qwenvl.server.cli import add_serve_subcommand, settings_from_args
    parser = argparse.ArgumentParser()
    serve = add_serve_subcommand(parser.add_subparsers())
    text = serve.format_help()
    for flag in ("--max-schema-bytes", "--max-schema-properties", "--max-schema-depth", "--grammar-compile-timeout",
                 "--health-stall-timeout"):
        assert flag in text
    settings = settings_from_args(parser.parse_args(["serve", "--max-schema-properties", "50",
                                                     "--grammar-compile-timeout", "2.5"]))
    assert settings.schema_limits.max_properties == 50 and settings.schema_limits.compile_timeout_s == 2.5
    assert settings.schema_limits.max_bytes == 65536 and settings.schema_limits.max_depth == 32
