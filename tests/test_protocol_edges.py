"""The protocol's rough edges (issue 38, section 3), through the real server and the official SDKs.

A scripted engine (test_server_fake_engine.FakeAsyncEngine) answers where the model's words do not matter;
the grammar items use the real compiler over the bundled checkpoint's vocabulary."""

from __future__ import annotations

import httpx
import openai
import pytest

from qwenvl.inputs.pdf import PdfError, parse_pages
from qwenvl.server.app import create_app
from qwenvl.server.settings import ServerSettings
from test_server_fake_engine import DS_PATH, FakeAsyncEngine, run_server

HI = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
CUT_CALL = ("<tool_call>\n", '{"name": "get_time", "arguments": {"zone": "UTC"}}', "\n</tool", "_call>")


@pytest.fixture(scope="module")
def url():
    engine = FakeAsyncEngine(pieces=CUT_CALL)
    with run_server(create_app(engine, ServerSettings(served_model_name="qwen-vl,Org/Qwen2-VL"))) as base:
        yield base


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def _error(exc) -> dict:
    return exc.response.json()["error"]


# --------------------------------------------------------------------------------------------- models
def test_models_retrieve_on_both_prefixes(url, client):
    card = client.models.retrieve("qwen-vl")
    assert card.id == "qwen-vl" and card.object == "model" and card.model_extra["max_model_len"] == 1000
    assert client.models.retrieve("Org/Qwen2-VL").id == "Org/Qwen2-VL"          # a Hub id keeps its slash
    compat = openai.OpenAI(base_url=url + "/compatible-mode/v1", api_key="none", max_retries=0)
    assert compat.models.retrieve("qwen-vl").id == "qwen-vl"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert _error(e.value)["code"] == "model_not_found"
    r = httpx.post(url + "/v1/models/qwen-vl", json={})
    assert r.status_code == 405 and r.headers["allow"] == "GET" and r.json()["error"]["code"] == "method_not_allowed"


def test_an_empty_model_is_a_400_and_a_long_one_is_not_echoed_whole(url, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="", messages=HI)
    assert _error(e.value)["param"] == "model" and "empty" in _error(e.value)["message"]
    long_name = "m" * 5000
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model=long_name, messages=HI)
    message = _error(e.value)["message"]
    assert "5000 characters" in message and len(message) < 300, message
    r = httpx.post(url + DS_PATH, json={"model": "", "input": {"messages": HI}})
    assert r.status_code == 400 and r.json()["code"] == "InvalidParameter"


# ---------------------------------------------------------------------------------------------- tools
@pytest.mark.parametrize("name, why", [("a</tool_call>b", "not a valid function name"),
                                       ("x" * 65, "not a valid function name"),
                                       ("get time", "not a valid function name")])
def test_tool_names_follow_openais_rule(client, name, why):
    tool = {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="qwen-vl", messages=HI, tools=[tool], tool_choice="required")
    assert why in _error(e.value)["message"] and _error(e.value)["param"] == "tools[0].function.name"


def test_duplicate_tool_names_are_refused(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="qwen-vl", messages=HI, tools=[TOOL, TOOL])
    assert "declared twice" in _error(e.value)["message"] and _error(e.value)["param"] == "tools[1].function.name"


def test_a_bad_parameters_schema_is_reported_against_the_tool(client):
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 3}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="qwen-vl", messages=HI, tools=[TOOL, bad], tool_choice="required")
    assert _error(e.value)["param"] == "tools[1].function.parameters", _error(e.value)
    assert _error(e.value)["message"].startswith("tools[1].function.parameters: invalid schema at properties")


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_call_cut_by_max_tokens_after_its_json_is_still_a_call(client, stream):
    """The fake model writes the call and is cut inside `</tool_call>` (max_tokens=3 of 4 pieces)."""
    kw = dict(model="qwen-vl", messages=HI, tools=[TOOL], max_tokens=3)
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        calls, finish, content = choice.message.tool_calls, choice.finish_reason, choice.message.content
    else:
        chunks = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices]
        calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
        finish = chunks[-1].choices[0].finish_reason
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert finish == "length" and len(calls) == 1 and not content
    assert calls[0].function.name == "get_time" and calls[0].function.arguments == '{"zone": "UTC"}'


# ------------------------------------------------------------------------------------------------ pdf
def test_a_reversed_page_range_says_so():
    with pytest.raises(PdfError, match=r"'3-1' is a reversed range; write the first page first, '1-3'"):
        parse_pages("3-1", 5)


# ------------------------------------------------------------------------------------------- schemas
def _schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


SELF = {"type": "object", "properties": {"child": {"$ref": "#/$defs/node"}}, "required": ["child"]}


@pytest.mark.parametrize("schema, why", [
    ({"$ref": "https://example.com/person.json"}, "only local references"),
    ({"$ref": "file:///etc/passwd"}, "only local references"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "points to nothing"),
    ({"type": "object", "required": ["id"], "additionalProperties": False, "properties": {"name": {}}},
     "no object can satisfy it"),
    ({"$defs": {"node": SELF}, "$ref": "#/$defs/node"}, "requires itself"),
])
def test_schemas_that_cannot_be_honoured_are_a_400(client, schema, why):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="qwen-vl", messages=HI, response_format=_schema_format(schema))
    assert why in _error(e.value)["message"] and _error(e.value)["param"] == "response_format.json_schema.schema"


def test_an_optionally_recursive_schema_is_fine(client):
    linked = {"$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}}}},
              "$ref": "#/$defs/node"}
    assert client.chat.completions.create(model="qwen-vl", messages=HI, max_tokens=1,
                                          response_format=_schema_format(linked)).choices


def test_numbers_are_bounded_unless_the_schema_bounds_them():
    import xgrammar as xgr
    from xgrammar.testing import _is_grammar_accept_string as accepts

    from qwenvl.structured.grammar import _json_grammar
    schema = {"type": "object", "properties": {"i": {"type": "integer"}, "x": {"type": "number"}},
              "required": ["i", "x"], "additionalProperties": False}
    g = _json_grammar(__import__("json").dumps(schema))
    assert accepts(g, '{"i":-1234567890123456,"x":0.1234567890123456e-123}')
    assert not accepts(g, '{"i":12345678901234567,"x":1}')          # 17 digits
    assert not accepts(g, '{"i":1,"x":1.12345678901234567}')        # a 17-digit fraction
    assert not accepts(g, '{"i":1,"x":1e1000}')                     # a 4-digit exponent
    wide = {"type": "integer", "minimum": 0, "maximum": 10 ** 18}   # the schema's own bounds win
    assert accepts(_json_grammar(__import__("json").dumps(wide)), str(10 ** 17))      # 18 digits
    assert isinstance(g, xgr.Grammar)


# ------------------------------------------------------------------------------- the OpenAPI document
def test_the_document_and_the_server_agree(url):
    doc = httpx.get(url + "/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert "/v1/models/{model}" in doc["paths"] and "/compatible-mode/v1/models/{model}" in doc["paths"]
    tokens = schemas["ChatCompletionRequest"]["properties"]["max_completion_tokens"]["anyOf"]
    assert {"type": "integer", "minimum": 1} in tokens
    assert {"type": "string", "minLength": 1} in schemas["ChatCompletionRequest"]["properties"]["model"]["anyOf"]
    for name in ("OpenAIMessage", "DSMessage"):
        assert {"type": "string"} in schemas[name]["properties"]["tool_call_id"]["anyOf"]
    # what the document says, the server does
    r = httpx.post(url + "/v1/chat/completions", json={"messages": HI, "max_completion_tokens": 2.5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"
    tool_turn = [*HI, {"role": "tool", "tool_call_id": 7, "content": "12:00"}]
    r = httpx.post(url + "/v1/chat/completions", json={"messages": tool_turn})
    assert r.status_code == 400 and "tool_call_id: must be a string" in r.json()["error"]["message"]
    body = {"input": {"messages": HI}}
    r = httpx.post(url + DS_PATH, json=body, headers={"X-DashScope-SSE": "yes"})
    assert r.status_code == 400 and "X-DashScope-SSE" in r.json()["message"] and r.json()["code"] == "InvalidParameter"
    assert httpx.post(url + DS_PATH, json=body, headers={"X-DashScope-SSE": "disable"}).status_code == 200
    for method, path in [("POST", "/health"), ("PUT", "/openapi.json"), ("DELETE", "/metrics"),
                         ("POST", "/v1/models"), ("GET", "/v1/chat/completions"), ("PUT", DS_PATH)]:
        r = httpx.request(method, url + path)
        assert r.status_code == 405 and r.headers["allow"], (method, path)
        body = r.json()
        assert (body["code"] == "MethodNotAllowed") if path == DS_PATH else (body["error"]["code"] == "method_not_allowed")
        assert method in (body.get("message") or body["error"]["message"])
    assert httpx.head(url + "/health").status_code == 200 and httpx.head(url + "/v1/models/qwen-vl").status_code == 200
