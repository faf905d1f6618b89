"""The real server (uvicorn on a loopback port) over the real engine with a tiny random checkpoint, called
with the official `openai` and `dashscope` SDKs and raw HTTP: both APIs, streaming, images from data URLs,
http(s) and file:// URLs, every client-error class in each route's error shape, auth, /health, /metrics."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import struct
import threading
import zlib

import dashscope
import httpx
import openai
import pytest
from PIL import Image

from qwenvl.engine.async_engine import AsyncEngine
from qwenvl.engine.llm_engine import EngineConfig, LLMEngine
from qwenvl.server.app import create_app
from qwenvl.server.settings import ServerSettings
from test_server_fake_engine import DS_PATH, run_server

MODEL = "qwen2_vl-current-0"      # the tiny checkpoint's folder: the name the server serves by default
KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def png(w=64, h=48, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def bomb_png(w=100_000, h=100_000) -> bytes:
    """A valid PNG header claiming w x h pixels (10 gigapixels): the header alone must refuse it."""
    data = bytearray(png(8, 8))
    ihdr = bytearray(data[16:29])                 # IHDR payload starts after signature(8) + len(4) + type(4)
    ihdr[0:8] = struct.pack(">II", w, h)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


@pytest.fixture(scope="module")
def servers(tiny_checkpoint, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    (media / "red.png").write_bytes(png())
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.png").write_bytes(png())
    engine = LLMEngine(tiny_checkpoint("qwen2_vl"), dtype="float32",
                       config=EngineConfig(kv_cache_gb=0.02, max_model_len=160))
    async_engine = AsyncEngine(engine, max_queue=16)
    main = create_app(async_engine, ServerSettings(
        api_key=KEY, allow_private_urls=True, allowed_local_media_path=str(media), max_images=2, max_body_mb=1,
        max_image_pixels=256 * 256))
    strict = create_app(async_engine, ServerSettings())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(media))
    handler.log_message = lambda *a: None
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    with run_server(main) as main_url, run_server(strict) as strict_url:
        yield {"main": main_url, "strict": strict_url, "media": media, "outside": outside,
               "image_url": f"http://127.0.0.1:{images.server_address[1]}/red.png"}
    images.shutdown()
    import asyncio
    asyncio.run(async_engine.shutdown(grace_s=1))


@pytest.fixture
def client(servers):
    return openai.OpenAI(base_url=servers["main"] + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture
def ds(servers):
    dashscope.base_http_api_url = servers["main"] + "/api/v1"
    return dashscope.MultiModalConversation


def oa_messages(url: str, text="Describe the image."):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def ds_messages(url: str, text="Describe the image."):
    return [{"role": "user", "content": [{"image": url}, {"text": text}]}]


# ------------------------------------------------------------------ OpenAI
def test_openai_plain_and_stream_agree(client):
    msgs = oa_messages(data_url(png()))
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=2)
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert choice.message.model_extra["boxes"] == []
    assert len(choice.logprobs.content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)

    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].delta.model_extra["boxes"] == []
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_openai_models_and_errors(client, servers):
    models = client.models.list().data
    assert len(models) == 1 and models[0].id.startswith("qwen2_vl") and models[0].model_extra["max_model_len"] == 160
    with pytest.raises(openai.BadRequestError, match=r"n: must be in \[1, 8\], got 9"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=9)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature="hot")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=servers["main"] + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}])
    r = httpx.post(servers["main"] + "/v1/chat/completions", content=b"{not json",
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) >= {"message", "type", "code"}
    assert "JSON" in r.json()["error"]["message"]
    r = httpx.post(servers["main"] + "/v1/chat/completions", json={"messages": "hi"}, headers=AUTH)
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(servers["main"] + "/compatible-mode/v1/chat/completions", json={"messages": []})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert KEY not in r.text


# ------------------------------------------------------------------ DashScope
def test_dashscope_plain_and_streams(ds, servers):
    msgs = ds_messages(data_url(png()))
    r = ds.call(model=MODEL, api_key=KEY, messages=msgs, max_tokens=6, temperature=0)
    assert r.status_code == 200 and r.request_id
    text = r.output.choices[0].message.content[0]["text"]
    assert r.output.choices[0].finish_reason in ("stop", "length") and r.output.choices[0].message.boxes == []
    u = r.usage
    assert u.input_tokens_details["image_tokens"] == u.image_tokens > 0
    assert u.total_tokens == u.input_tokens + u.output_tokens

    events = list(ds.call(model=MODEL, api_key=KEY, messages=msgs, max_tokens=6, temperature=0,
                          stream=True, incremental_output=True))
    assert "".join(e.output.choices[0].message.content[0]["text"] for e in events) == text
    assert [e.output.choices[0].finish_reason for e in events][:-1] == ["null"] * (len(events) - 1)
    # incremental_output=False: the SDK asks for deltas and merges them itself; the raw API sends full text.
    events = list(ds.call(model=MODEL, api_key=KEY, messages=msgs, max_tokens=6, temperature=0,
                          stream=True, incremental_output=False))
    assert events[-1].output.choices[0].message.content[0]["text"] == text

    body = {"model": MODEL, "input": {"messages": msgs},
            "parameters": {"max_tokens": 6, "temperature": 0, "incremental_output": False}}
    raw = httpx.post(servers["main"] + DS_PATH, json=body, headers={**AUTH, "X-DashScope-SSE": "enable"}).text
    frames = [f for f in raw.split("\n\n") if f.strip()]
    lines = frames[0].split("\n")
    assert lines[0] == "id:1" and lines[1] == "event:result" and lines[2] == ":HTTP_STATUS/200"
    texts = [json.loads(f.split("\ndata:", 1)[1])["output"]["choices"][0]["message"]["content"][0]["text"]
             for f in frames]
    assert texts[-1] == text and all(text.startswith(t) for t in texts)
    # "stream": true in parameters also streams, result_format text gives output.text
    body["parameters"].update(stream=True, result_format="text")
    raw = httpx.post(servers["main"] + DS_PATH, json=body, headers=AUTH).text
    last = json.loads(raw.strip().split("\n\n")[-1].split("\ndata:", 1)[1])
    assert last["output"]["text"] == text and last["output"]["finish_reason"] in ("stop", "length")


def test_dashscope_errors(ds, servers):
    r = ds.call(model=MODEL, api_key="wrong", messages=[{"role": "user", "content": [{"text": "hi"}]}])
    assert r.status_code == 401 and r.code == "InvalidApiKey"
    r = httpx.post(servers["main"] + DS_PATH, content=b"[1,", headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and set(r.json()) == {"code", "message", "request_id"}
    r = httpx.post(servers["main"] + DS_PATH, headers=AUTH, json={
        "model": MODEL, "input": {"messages": [{"role": "user", "content": [{"text": "hi"}]}]},
        "parameters": {"top_p": "x"}})
    assert r.status_code == 400 and "parameters.top_p" in r.json()["message"]
    r = ds.call(model=MODEL, api_key=KEY, messages=ds_messages("data:image/png;base64," + base64.b64encode(
        b"this is not an image at all").decode()))
    assert r.status_code == 400 and r.code == "InvalidParameter" and "format" in r.message


# ------------------------------------------------------------------ media and limits
def test_http_image_allowed_only_with_allow_private_urls(servers, client):
    r = client.chat.completions.create(model=MODEL, messages=oa_messages(servers["image_url"]), max_tokens=2)
    assert r.usage.prompt_tokens > 0
    strict = openai.OpenAI(base_url=servers["strict"] + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="loopback.*allow-private-urls"):
        strict.chat.completions.create(model=MODEL, messages=oa_messages(servers["image_url"]), max_tokens=2)
    dashscope.base_http_api_url = servers["strict"] + "/api/v1"
    r = dashscope.MultiModalConversation.call(model=MODEL, api_key="x", messages=ds_messages(servers["image_url"]))
    assert r.status_code == 400 and "loopback" in r.message


def test_file_urls_only_under_the_allowed_folder(servers, client):
    ok = (servers["media"] / "red.png").as_uri()
    assert client.chat.completions.create(model=MODEL, messages=oa_messages(ok), max_tokens=2).usage.prompt_tokens
    for url in ((servers["outside"] / "secret.png").as_uri(), ok.replace("red.png", "../" + servers["outside"].name
                                                                          + "/secret.png")):
        with pytest.raises(openai.BadRequestError, match="outside"):
            client.chat.completions.create(model=MODEL, messages=oa_messages(url), max_tokens=2)
    strict = openai.OpenAI(base_url=servers["strict"] + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="allowed-local-media-path"):
        strict.chat.completions.create(model=MODEL, messages=oa_messages(ok), max_tokens=2)


@pytest.mark.parametrize("case, status, needle", [
    ("body", 413, "limit"),
    ("images", 400, "too many images"),
    ("pixels", 400, "300x300"),
    ("bomb", 400, "pixels"),
    ("format", 400, "format"),
    ("context", 400, "context is 160 tokens"),
    ("max_tokens", 400, "at most"),
])
def test_limits_in_both_shapes(servers, case, status, needle):
    url = data_url(png())
    images, text, params = [url], "Describe.", {"max_tokens": 4}
    if case == "body":
        images = [data_url(b"\0" * (1200 * 1024))]
    elif case == "images":
        images = [url] * 3
    elif case == "pixels":
        images = [data_url(png(300, 300))]
    elif case == "bomb":
        images = [data_url(bomb_png())]
    elif case == "format":
        images = [data_url(b"GIF89a-not-really", "image/gif")]
    elif case == "context":
        text = "The cat sits on the red mat near the window. " * 40
    elif case == "max_tokens":
        params = {"max_tokens": 150}
    oa = {"model": MODEL, "messages": [{"role": "user", "content": [
        *({"type": "image_url", "image_url": {"url": u}} for u in images), {"type": "text", "text": text}]}], **params}
    r = httpx.post(servers["main"] + "/v1/chat/completions", json=oa, headers=AUTH)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"] and r.json()["error"]["type"] == "invalid_request_error"
    ds_body = {"model": MODEL, "input": {"messages": [{"role": "user", "content": [
        *({"image": u} for u in images), {"text": text}]}]}, "parameters": params}
    r = httpx.post(servers["main"] + DS_PATH, json=ds_body, headers=AUTH)
    assert r.status_code == status, r.text
    assert needle in r.json()["message"] and r.json()["request_id"]


def test_health_without_key_metrics_with_it(servers, client):
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert httpx.get(servers["main"] + "/health").json()["status"] == "ok"
    assert httpx.get(servers["main"] + "/metrics").status_code == 401
    m = httpx.get(servers["main"] + "/metrics", headers=AUTH)
    assert m.status_code == 200
    for name in ("qwenvl_http_requests_total", "qwenvl_time_to_first_token_seconds_bucket",
                 "qwenvl_request_latency_seconds_bucket", "qwenvl_prompt_tokens_total",
                 "qwenvl_generation_tokens_total", "qwenvl_queue_depth", "qwenvl_engine_kv_blocks_used",
                 "qwenvl_prefix_cache_hit_rate", "qwenvl_encoder_cache_hit_rate"):
        assert name in m.text
    assert httpx.get(servers["main"] + "/v1/models").status_code == 401


@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "repetition_penalty"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused_on_both_apis(servers, field, value):
    """Python's json reads NaN / Infinity; a sampler fed them answers garbage with 200 (issue 29 item 4)."""
    msgs = '[{"role": "user", "content": "hi"}]'
    body = f'{{"model": "{MODEL}", "messages": {msgs}, "max_tokens": 2, "{field}": {value}}}'
    r = httpx.post(servers["main"] + "/v1/chat/completions", content=body.encode(),
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and field in r.json()["error"]["message"] and "finite" in r.json()["error"]["message"]
    body = (f'{{"model": "{MODEL}", "input": {{"messages": [{{"role": "user", "content": [{{"text": "hi"}}]}}]}}, '
            f'"parameters": {{"max_tokens": 2, "{field}": {value}}}}}')
    r = httpx.post(servers["main"] + DS_PATH, content=body.encode(), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and f"parameters.{field}" in r.json()["message"] and "finite" in r.json()["message"]


def test_sampling_params_refuse_non_finite_numbers():
    from qwenvl import SamplingParams
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        SamplingParams(temperature=float("nan"))
    with pytest.raises(ValueError, match="presence_penalty must be a finite number"):
        SamplingParams(presence_penalty=float("inf"))


def test_unpaired_surrogates_are_a_400_naming_the_field(servers):
    """The tokenizer cannot encode "\\ud800"; it used to surface as a 500 (issue 29 item 2)."""
    headers = {**AUTH, "Content-Type": "application/json"}
    body = b'{"max_tokens": 2, "messages": [{"role": "user", "content": "hi \\ud800"}]}'
    r = httpx.post(servers["main"] + "/v1/chat/completions", content=body, headers=headers)
    assert r.status_code == 400 and "messages[0].content" in r.json()["error"]["message"]
    assert "surrogate" in r.json()["error"]["message"]
    body = (b'{"input": {"messages": [{"role": "user", "content": [{"text": "\\udfff x"}]}]},'
            b' "parameters": {"max_tokens": 2}}')
    r = httpx.post(servers["main"] + DS_PATH, content=body, headers=headers)
    assert r.status_code == 400 and "surrogate" in r.json()["message"]
    r = httpx.post(servers["main"] + "/v1/chat/completions", headers=AUTH,
                   json={"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "still serving"}]})
    assert r.status_code == 200


def test_deeply_nested_json_is_a_400_on_both_apis(servers):
    """100,000 '[' made the JSON parser raise RecursionError, answered 500 (issue 29 item 3)."""
    body = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    headers = {**AUTH, "Content-Type": "application/json"}
    r = httpx.post(servers["main"] + "/v1/chat/completions", content=body, headers=headers)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
    r = httpx.post(servers["main"] + DS_PATH, content=body, headers=headers)
    assert r.status_code == 400 and "nested too deeply" in r.json()["message"]


def test_top_p_zero_is_greedy_on_both_apis(servers):
    """OpenAI accepts top_p 0 (keep only the most likely token); it was refused with a 400 (issue 29 item 9)."""
    msgs = [{"role": "user", "content": "Say something."}]

    def openai_text(**extra):
        r = httpx.post(servers["main"] + "/v1/chat/completions", headers=AUTH,
                       json={"model": MODEL, "max_tokens": 8, "messages": msgs, **extra})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]
    greedy = openai_text(temperature=0)
    assert openai_text(temperature=1.5, top_p=0, seed=7) == greedy == openai_text(temperature=1.5, top_p=0, seed=8)
    r = httpx.post(servers["main"] + DS_PATH, headers=AUTH, json={
        "model": MODEL, "input": {"messages": [{"role": "user", "content": [{"text": "Say something."}]}]},
        "parameters": {"max_tokens": 8, "temperature": 1.5, "top_p": 0, "seed": 7}})
    assert r.status_code == 200, r.text
    assert r.json()["output"]["choices"][0]["message"]["content"][0]["text"] == greedy


def test_basic_auth_is_told_to_use_a_bearer_key_and_failed_logins_are_logged(servers, caplog):
    """A Basic header was answered "missing API key"; failed logins left no trace (issue 29 item 9)."""
    with caplog.at_level("WARNING", logger="qwenvl.server"):
        r = httpx.get(servers["main"] + "/v1/models", headers={"Authorization": "Basic dXNlcjpwYXNz"})
        assert r.status_code == 401 and "use a Bearer key" in r.json()["error"]["message"]
        r = httpx.get(servers["main"] + "/v1/models", headers={"Authorization": "Bearer wrong-secret-xyz"})
        assert r.status_code == 401
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "Bearer key" in logged and "invalid API key" in logged and "wrong-secret-xyz" not in logged
