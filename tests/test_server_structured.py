"""Structured output and tool calling through the real server on a tiny random checkpoint, with both SDKs.

A random model writes noise: every valid JSON document and every tool call below is the grammar's work."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import dashscope
import httpx
import jsonschema
import openai
import pytest

from qwenvl.engine.async_engine import AsyncEngine
from qwenvl.engine.llm_engine import EngineConfig, LLMEngine
from qwenvl.server.app import create_app
from qwenvl.server.settings import ServerSettings
from test_server_fake_engine import run_server

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
          "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}
FLAGS = {"type": "object", "properties": {"ok": {"type": "boolean"}, "kind": {"enum": ["a", "b"]}},
         "required": ["ok", "kind"], "additionalProperties": False}
ITEMS = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "integer", "maximum": 9},
                                                    "minItems": 1, "maxItems": 3}},
         "required": ["items"], "additionalProperties": False}
CODE = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]$"}},
        "required": ["code"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
    "required": ["city"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
             "required": ["zone"], "additionalProperties": False}}}]
ASK = [{"role": "user", "content": "Answer in JSON."}]

MODEL = "qwenvl-test"          # the --served-model-name the test server answers to


@pytest.fixture(scope="module")
def url(tiny_checkpoint):
    engine = LLMEngine(tiny_checkpoint("qwen3_vl"), dtype="float32",
                       config=EngineConfig(kv_cache_gb=0.05, max_model_len=1024))
    async_engine = AsyncEngine(engine, max_queue=16)
    with run_server(create_app(async_engine, ServerSettings(served_model_name=MODEL))) as base:
        yield base
    asyncio.run(async_engine.shutdown(grace_s=1))


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_openai_json_schema_plain_and_streamed(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, seed=1, temperature=1.0,
                                       response_format=schema_format(PERSON))
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    chunks = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, seed=2, temperature=1.0,
                                            response_format=schema_format(FLAGS), stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), FLAGS)


def test_openai_json_object_is_rooted_at_an_object(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=80, seed=3, temperature=0.7,
                                       response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:   # cut by max_tokens: still the start of an object
        assert r.choices[0].message.content.startswith("{")


def test_four_schemas_in_one_batch_with_a_free_request(client):
    schemas = [PERSON, FLAGS, ITEMS, CODE]

    def ask(i):
        if i == len(schemas):
            return client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, seed=i)
        return client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=60, seed=i, temperature=1.0,
                                              response_format=schema_format(schemas[i]))

    with ThreadPoolExecutor(len(schemas) + 1) as pool:
        answers = list(pool.map(ask, range(len(schemas) + 1)))
    for r, schema in zip(answers, schemas):
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    assert answers[-1].choices[0].finish_reason == "length"


def test_openai_tool_call_required_named_and_streamed(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=80, seed=4, tools=TOOLS,
                                       tool_choice="required")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    spec = next(t["function"] for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), spec["parameters"])

    named = {"type": "function", "function": {"name": "get_time"}}
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=80, seed=5, tools=TOOLS,
                                                 tool_choice=named, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [d.index for d in deltas] == [0] and deltas[0].function.name == "get_time"
    assert json.loads(deltas[0].function.arguments)["zone"] in ("UTC", "CET")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # the SDK's own assistant message (content None) and a tool result go back in the next request
    follow = ASK + [r.choices[0].message.model_dump(exclude_none=True, include={"role", "content", "tool_calls"}),
                    {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    follow[1].setdefault("content", None)
    again = client.chat.completions.create(model=MODEL, messages=follow, max_tokens=5, tools=TOOLS,
                                           tool_choice="none")
    assert again.choices[0].message.tool_calls is None and again.choices[0].finish_reason in ("stop", "length")


def test_dashscope_response_format_and_tools(url):
    dashscope.base_http_api_url = url + "/api/v1"
    msgs = [{"role": "user", "content": [{"text": "Answer in JSON."}]}]
    r = dashscope.MultiModalConversation.call(model=MODEL, api_key="none", messages=msgs, max_tokens=80, seed=6,
                                              response_format={"type": "json_object"})
    assert r.status_code == 200, r.message
    text = r.output.choices[0].message.content[0]["text"]
    assert text.startswith("{")
    r = dashscope.MultiModalConversation.call(model=MODEL, api_key="none", messages=msgs, max_tokens=80, seed=7,
                                              tools=TOOLS, tool_choice="required")
    assert r.status_code == 200, r.message
    choice = r.output.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call["function"]["name"] in ("get_weather", "get_time")
    json.loads(call["function"]["arguments"])


@pytest.mark.parametrize("body, field", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"tools": {"name": "f"}}, "tools"),
    ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_structured_requests_are_400_naming_the_field(url, body, field):
    r = httpx.post(url + "/v1/chat/completions", json={"messages": ASK, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and field in r.json()["error"]["message"]
    ds = httpx.post(url + "/api/v1/services/aigc/multimodal-generation/generation",
                    json={"input": {"messages": ASK}, "parameters": body})
    assert ds.status_code == 400 and f"parameters.{field}" in ds.json()["message"]


def test_openai_n_choices_plain_and_streamed_with_top_logprobs(client):
    kw = dict(model=MODEL, messages=ASK, max_tokens=6, temperature=1.0, seed=11, n=3, logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({tuple(t.token for t in c.logprobs.content) for c in r.choices}) > 1   # own seed per choice
    for c in r.choices:
        assert all(len(t.top_logprobs) == 3 for t in c.logprobs.content)
        assert all(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
                   for t in c.logprobs.content)
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    again = client.chat.completions.create(**kw)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]  # seeded
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts = ["", "", ""]
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == [c.message.content for c in r.choices]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_dashscope_n_choices(url):
    r = httpx.post(url + "/api/v1/services/aigc/multimodal-generation/generation", json={
        "input": {"messages": ASK}, "parameters": {"n": 2, "max_tokens": 4, "seed": 3, "temperature": 1.0}})
    assert r.status_code == 200, r.text
    choices = r.json()["output"]["choices"]
    assert [c["index"] for c in choices] == [0, 1] and r.json()["usage"]["output_tokens"] >= 2
    bad = httpx.post(url + "/api/v1/services/aigc/multimodal-generation/generation", json={
        "input": {"messages": ASK}, "parameters": {"n": 0}})
    assert bad.status_code == 400 and "parameters.n" in bad.json()["message"]


def test_dashscope_ocr_tasks(url):
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (240, 240, 240)).save(buf, "PNG")
    image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    msgs = [{"role": "user", "content": [{"image": image}, {"text": "what is this?"}]}]
    path = url + "/api/v1/services/aigc/multimodal-generation/generation"
    fields = {"total": "the amount due", "date": "the invoice date"}
    r = httpx.post(path, json={"input": {"messages": msgs}, "parameters": {
        "max_tokens": 700, "ocr_options": {"task": "key_information_extraction", "task_config": {"result_schema": fields}}}})
    assert r.status_code == 200, r.text
    item = r.json()["output"]["choices"][0]["message"]["content"][0]
    assert set(item["ocr_result"]["kv_result"]) == set(fields) and json.loads(item["text"]) == item["ocr_result"]["kv_result"]
    r = httpx.post(path, json={"input": {"messages": msgs}, "parameters": {
        "max_tokens": 8, "ocr_options": {"task": "advanced_recognition"}}})
    assert r.status_code == 200 and "words_info" in r.json()["output"]["choices"][0]["message"]["content"][0]["ocr_result"]
    for params, field in [({"ocr_options": {"task": "poetry"}}, "parameters.ocr_options.task"),
                          ({"ocr_options": {"task": "key_information_extraction"}},
                           "parameters.ocr_options.task_config.result_schema"),
                          ({"ocr_options": {"task": 5}}, "parameters.ocr_options.task")]:
        bad = httpx.post(path, json={"input": {"messages": msgs}, "parameters": params})
        assert bad.status_code == 400 and field in bad.json()["message"], bad.text
    no_image = httpx.post(path, json={"input": {"messages": ASK}, "parameters": {"ocr_options": {"task": "table_parsing"}}})
    assert no_image.status_code == 400 and "image" in no_image.json()["message"]
