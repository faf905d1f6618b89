"""Grammar-constrained decoding through the engine with the bundled model: only the grammar makes its output valid."""

import json

import jsonschema
import pytest

from qwenvl.llm import LLM
from qwenvl.sampling_params import SamplingParams
from qwenvl.structured import InvalidStructuredOutputError, StructuredOutput, parse_tool_calls

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
          "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}
FLAGS = {"type": "object", "properties": {"ok": {"type": "boolean"}, "kind": {"enum": ["a", "b"]}},
         "required": ["ok", "kind"], "additionalProperties": False}
MSGS = [{"role": "user", "content": "Give me JSON"}]


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu")


def test_schemas_and_free_requests_share_a_batch(llm):
    schemas = [PERSON, FLAGS, PERSON, FLAGS]
    params = [SamplingParams(seed=i, max_tokens=120, structured=StructuredOutput.json_schema(s))
              for i, s in enumerate(schemas)] + [SamplingParams(seed=9, max_tokens=8)]
    outs = llm.generate([MSGS] * len(params), params)
    for out, schema in zip(outs, schemas):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)
        assert list(json.loads(out.text)) == list(schema["properties"])     # declared order kept
    assert outs[-1].finish_reason == "length"


def test_forced_tool_call_parses_and_validates(llm):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
        "required": ["city"], "additionalProperties": False}}}]
    out = llm.chat(MSGS, SamplingParams(seed=1, max_tokens=80, structured=StructuredOutput.tool_call(tools)))
    assert out.finish_reason == "stop", out.text
    content, calls = parse_tool_calls(out.text)
    assert content is None and [c.name for c in calls] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0].arguments), tools[0]["function"]["parameters"])


def test_invalid_schema_and_unknown_tool_are_value_errors(llm):
    with pytest.raises(InvalidStructuredOutputError, match="type"):
        StructuredOutput.json_schema({"type": 5})
    with pytest.raises(InvalidStructuredOutputError, match="nope"):
        StructuredOutput.tool_call([{"type": "function", "function": {"name": "f"}}], name="nope")
    assert llm.engine.stats()["num_running"] == 0


WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
    "required": ["city"], "additionalProperties": False}}},
           {"type": "function", "function": {"name": "get_time", "parameters": {
               "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
               "required": ["zone"], "additionalProperties": False}}}]


def test_llm_chat_tools_required_and_named(llm):
    out = llm.chat(MSGS, SamplingParams(seed=3, max_tokens=80), tools=WEATHER, tool_choice="required")
    assert out.finish_reason == "stop", out.text
    assert len(out.tool_calls) == 1 and out.tool_calls[0].name in ("get_weather", "get_time")
    named = llm.chat(MSGS, SamplingParams(seed=4, max_tokens=80), tools=WEATHER,
                     tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert [c.name for c in named.tool_calls] == ["get_time"]
    assert json.loads(named.tool_calls[0].arguments)["zone"] in ("UTC", "CET")


def test_llm_tools_are_in_the_prompt_and_tool_turns_render(llm):
    plain = llm.engine.prepare(MSGS)
    offered = llm.engine.prepare(MSGS, tools=WEATHER)
    text = llm.engine.tokenizer.decode(offered.token_ids)
    assert len(offered.token_ids) > len(plain.token_ids) and '"name": "get_time"' in text
    turns = MSGS + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"}]
    text = llm.engine.tokenizer.decode(llm.engine.prepare(turns, tools=WEATHER).token_ids)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    assert "<tool_response>\nrain\n</tool_response>" in text


def test_bad_tools_and_tool_choice_name_the_field(llm):
    with pytest.raises(InvalidStructuredOutputError, match=r"tools\[0\].function.name"):
        llm.chat(MSGS, tools=[{"type": "function", "function": {}}])
    with pytest.raises(InvalidStructuredOutputError, match="tool_choice.*'nope'"):
        llm.chat(MSGS, tools=WEATHER, tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(InvalidStructuredOutputError, match="tools: must be a list"):
        llm.chat(MSGS, tools={"name": "x"})
    assert llm.engine.stats()["num_running"] == 0


def test_llm_choices_are_n_seeded_answers_with_top_logprobs(llm):
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=6, logprobs=3)
    outs = llm.choices(MSGS, params, n=3)
    again = llm.choices(MSGS, params, n=3)
    assert [o.token_ids for o in outs] == [o.token_ids for o in again]          # reproducible
    assert len({tuple(o.token_ids) for o in outs}) > 1                          # but not all the same
    assert all(len(lp) >= 3 for o in outs for lp in o.logprobs)
    with pytest.raises(ValueError, match="n must be >= 1"):
        llm.choices(MSGS, params, n=0)
