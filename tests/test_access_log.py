"""`qwenvl serve`'s log: a line per API request (method, route, status, tokens, seconds) and a throughput
line every few seconds while busy."""

from __future__ import annotations

import logging

import httpx

from qwenvl.server.access_log import AccessLog, ThroughputLog, TokenCounter
from qwenvl.server.app import create_app
from qwenvl.server.settings import ServerSettings
from test_server_fake_engine import DS_PATH, FakeAsyncEngine, run_server

HI = [{"role": "user", "content": "hi"}]


def test_one_line_per_api_request_with_its_tokens(caplog):
    caplog.set_level(logging.INFO, logger="qwenvl.server")
    counter = TokenCounter(FakeAsyncEngine(pieces=("a", "b", "c")))
    with run_server(AccessLog(create_app(counter, ServerSettings(), mount_ui=None))) as url:
        assert httpx.post(url + "/v1/chat/completions", json={"messages": HI, "n": 2}).status_code == 200
        assert httpx.post(url + DS_PATH, json={"input": {"messages": HI}, "parameters": {"max_tokens": 2}},
                          headers={"X-DashScope-SSE": "enable"}).status_code == 200
        assert httpx.post(url + "/v1/chat/completions", json={"messages": "nope"}).status_code == 400
        assert httpx.get(url + "/health").status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "qwenvl.server"]
    # the fake engine: 10 prompt tokens, one token per piece; two choices count the prompt once
    assert lines[0].startswith("POST /v1/chat/completions 200 prompt_tokens=10 completion_tokens=6 ")
    assert lines[1].startswith(f"POST {DS_PATH} 200 prompt_tokens=10 completion_tokens=2 ")
    assert lines[2].startswith("POST /v1/chat/completions 400 prompt_tokens=0 completion_tokens=0 ")
    assert lines[2].endswith("s: messages: must be a non-empty list, got str")      # the reason
    assert all(line.endswith("s") for line in lines[:2]) and len(lines) == 3     # /health is not logged
    assert (counter.prompt_tokens, counter.generated_tokens) == (30, 8)


def test_throughput_line_while_busy_and_silence_when_idle():
    counter = TokenCounter(FakeAsyncEngine())
    stats = {"num_running": 0, "num_waiting": 0, "kv_blocks_total": 200, "kv_blocks_used": 0}
    tlog = ThroughputLog(counter, lambda: stats, every_s=5.0)
    assert tlog.line() is None                                   # idle: nothing to say
    counter.prompt_tokens, counter.generated_tokens = 500, 40
    stats.update(num_running=2, num_waiting=1, kv_blocks_used=50)
    line = tlog.line()
    assert line.startswith("throughput: prompt ") and "running 2, waiting 1, KV cache 25.0%" in line
    prompt_rate = float(line.split("prompt ")[1].split(" tokens/s")[0])
    assert prompt_rate > 500                                     # 500 tokens in far less than a second
    stats.update(num_running=0, num_waiting=0, kv_blocks_used=0)
    assert tlog.line() is None                                   # nothing new since: silent again


def test_refusals_carry_their_reason_on_one_line(caplog):
    caplog.set_level(logging.INFO, logger="qwenvl.server")
    with run_server(AccessLog(create_app(FakeAsyncEngine(), ServerSettings(api_key="k"), mount_ui=None))) as url:
        key = {"Authorization": "Bearer k"}
        assert httpx.post(url + "/v1/chat/completions", json={"messages": HI}).status_code == 401
        forged = {"role": "bot\nPOST /v1/chat/completions 200 prompt_tokens=1", "content": "hi"}
        assert httpx.post(url + DS_PATH, headers=key, json={"input": {"messages": [forged]}}).status_code == 400
        assert httpx.post(url + "/v1/chat/completions", headers=key,
                          json={"messages": [{"role": "user", "content": "x" * 1000}], "model": "m" * 500}).status_code == 404
    lines = [r.getMessage() for r in caplog.records if r.name == "qwenvl.server" and r.getMessage().startswith("POST")]
    assert lines[0].endswith("s: missing API key: send the header 'Authorization: Bearer <key>'")
    assert lines[1].startswith(f"POST {DS_PATH} 400 ") and "is not a known role" in lines[1] and "\n" not in lines[1]
    assert " 404 " in lines[2] and "does not exist on this server" in lines[2] and len(lines[2]) < 500


def test_error_reason_reads_both_shapes_and_keeps_one_line():
    from qwenvl.server.access_log import error_reason

    assert error_reason(b'{"error": {"message": "bad\\nline\\u0000here"}}') == "bad line here"
    assert error_reason(b'{"code": "InvalidParameter", "message": "x", "request_id": "r"}') == "x"
    assert error_reason(b'{"message": "' + b"y" * 400 + b'"}').endswith("y...")
    assert error_reason(b"not json") == error_reason(b'{"message": 3}') == error_reason(b"[1]") == ""
