"""vLLM's `ignore_eos` and `min_tokens` on both HTTP APIs, with the bundled model (which answers briefly and
ends with its eos): lengths exact through the official `openai` (streamed and not) and `dashscope` SDKs, and
every bad value a 400 naming the field."""

from __future__ import annotations

import asyncio

import dashscope
import httpx
import openai
import pytest

from qwenvl.engine.async_engine import AsyncEngine
from qwenvl.engine.llm_engine import EngineConfig, LLMEngine
from qwenvl.server.app import create_app
from qwenvl.server.settings import ServerSettings
from test_server_fake_engine import DS_PATH, run_server

MODEL = "qwenvl-bundled"
QUESTION = [{"role": "user", "content": "Hello! Who are you?"}]


@pytest.fixture(scope="module")
def url():
    engine = LLMEngine(None, device="cpu", dtype="float32", config=EngineConfig(kv_cache_gb=0.05, max_model_len=400))
    async_engine = AsyncEngine(engine, max_queue=16)
    with run_server(create_app(async_engine, ServerSettings(default_max_tokens=48))) as u:
        yield u
    asyncio.run(async_engine.shutdown(grace_s=1))


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def natural(client):
    """The greedy answer without either parameter: it must end by eos well before max_tokens, or the tests
    below would not show anything."""
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=64, temperature=0)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 40, r
    return r.choices[0].message.content, r.usage.completion_tokens


def test_openai_ignore_eos_generates_exactly_max_tokens_plain_and_streamed(client, natural):
    n = natural[1] + 7
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=n, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == n and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content.startswith(natural[0])
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=n, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == n
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content


def test_openai_min_tokens_holds_eos_back(client, natural):
    m = natural[1] + 5
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=m + 20, temperature=0,
                                       extra_body={"min_tokens": m})
    assert r.usage.completion_tokens >= m
    assert r.choices[0].message.content.startswith(natural[0])
    # min_tokens below the natural length changes nothing; min_tokens == max_tokens without max_tokens too
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=64, temperature=0,
                                       extra_body={"min_tokens": 1})
    assert (r.choices[0].message.content, r.usage.completion_tokens) == natural
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, extra_body={"min_tokens": 60})
    assert r.usage.completion_tokens >= 60          # above the server's default max_tokens (48): raised to it


def test_dashscope_ignore_eos_and_min_tokens(url, natural):
    dashscope.base_http_api_url = url + "/api/v1"
    msgs = [{"role": "user", "content": [{"text": QUESTION[0]["content"]}]}]
    n = natural[1] + 6
    r = dashscope.MultiModalConversation.call(model=MODEL, api_key="none", messages=msgs, max_tokens=n,
                                              temperature=0, ignore_eos=True)
    assert r.status_code == 200 and r.usage.output_tokens == n, r
    assert r.output.choices[0].finish_reason == "length"
    events = list(dashscope.MultiModalConversation.call(
        model=MODEL, api_key="none", messages=msgs, max_tokens=n + 10, temperature=0, min_tokens=n,
        stream=True, incremental_output=True))
    assert all(e.status_code == 200 for e in events) and events[-1].usage.output_tokens >= n


@pytest.mark.parametrize("field,value,says", [
    ("ignore_eos", '"yes"', "true or false"),
    ("ignore_eos", "1", "true or false"),
    ("min_tokens", "-1", "must be >= 0"),
    ("min_tokens", "2.5", "an integer"),
    ("min_tokens", "true", "an integer"),
    ("min_tokens", "9", "more than max_tokens"),
    ("min_tokens", "1000", "context"),             # without max_tokens: past the model's context
])
def test_bad_values_are_a_400_naming_the_field_on_both_apis(url, field, value, says):
    max_tokens = '"max_tokens": 8, ' if says != "context" else ""
    headers = {"Content-Type": "application/json"}
    body = f'{{"messages": [{{"role": "user", "content": "hi"}}], {max_tokens}"{field}": {value}}}'
    r = httpx.post(url + "/v1/chat/completions", content=body.encode(), headers=headers)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert says in error["message"] and (field in error["message"] or error.get("param") == field), error
    body = (f'{{"input": {{"messages": [{{"role": "user", "content": [{{"text": "hi"}}]}}]}}, '
            f'"parameters": {{{max_tokens}"{field}": {value}}}}}')
    r = httpx.post(url + DS_PATH, content=body.encode(), headers=headers)
    assert r.status_code == 400 and says in r.json()["message"] and field in r.json()["message"], r.text


def test_openapi_documents_both_fields(url):
    doc = httpx.get(url + "/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for name in ("ChatCompletionRequest", "DSParameters"):
        props = schemas[name]["properties"]
        assert "ignore_eos" in props and "min_tokens" in props, name
        assert "vLLM" in props["min_tokens"]["description"]


def test_min_tokens_never_samples_eos_early_python_api():
    """The server tests see text only; here the token ids: no eos inside the first min_tokens (the sampler
    masks it, rather than the eos being sampled and skipped over)."""
    from qwenvl import LLM, SamplingParams
    llm = LLM(dtype="float32")
    eos = set(llm.engine.tokenizer.eos_token_ids)
    first = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=64))
    assert first.finish_reason == "stop" and first.token_ids[-1] in eos
    m = len(first.token_ids) + 4
    out = llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=m + 30, min_tokens=m))
    assert len(out.token_ids) > m and not eos & set(out.token_ids[:m])
    assert out.token_ids[:len(first.token_ids) - 1] == first.token_ids[:-1]
