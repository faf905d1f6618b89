"""StructuredOutput validation and the hermes tool-call parser (whole text and streamed)."""

import json

import pytest

from qwenvl.structured import (InvalidStructuredOutputError, StructuredOutput,
                               ToolCallStreamParser, parse_tool_calls)

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'


def test_equal_schemas_share_a_cache_key():
    a = StructuredOutput.json_schema({"type": "object", "properties": {"x": {"type": "integer"}}})
    b = StructuredOutput.json_schema('{"type": "object",  "properties": {"x": {"type": "integer"}}}')
    assert a == b and hash(a) == hash(b)
    assert a.schema["properties"]["x"]["type"] == "integer"


@pytest.mark.parametrize("schema, words", [
    ({"type": "objekt"}, ["type"]),
    ({"properties": {"x": {"minLength": "three"}}}, ["properties/x/minLength"]),
    ("{not json", ["not valid JSON"]),
    ([1, 2], ["must be an object"]),
])
def test_invalid_schema_is_a_value_error_naming_the_problem(schema, words):
    with pytest.raises(InvalidStructuredOutputError) as e:
        StructuredOutput.json_schema(schema)
    assert isinstance(e.value, ValueError)
    for w in words:
        assert w in str(e.value)


def test_unknown_kind_is_rejected():
    with pytest.raises(InvalidStructuredOutputError, match="kind"):
        StructuredOutput("yaml")


def test_parse_tool_calls_splits_content_and_calls():
    content, calls = parse_tool_calls("Let me check.\n" + CALL + "\n" + CALL.replace("Paris", "Oslo"))
    assert content == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "get_weather"]
    assert json.loads(calls[1].arguments) == {"city": "Oslo", "days": 2}
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")
    assert calls[0].to_openai()["type"] == "function"


def test_only_calls_gives_null_content_and_no_calls_keeps_text():
    assert parse_tool_calls(CALL)[0] is None
    assert parse_tool_calls("plain answer") == ("plain answer", [])


def test_malformed_block_stays_content():
    text = "<tool_call>{not json}</tool_call>"
    assert parse_tool_calls(text) == (text, [])
    assert parse_tool_calls('<tool_call>{"name": "f"') == ('<tool_call>{"name": "f"', [])


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_stream_parser_matches_whole_parse_for_any_chunking(step):
    text = "Sure <tool<b> " + CALL + " then " + CALL.replace("Paris", "Rome") + " done"
    parser, content, indexed = ToolCallStreamParser(), "", []
    for i in range(0, len(text), step):
        d = parser.feed(text[i:i + step])
        assert OPEN_FRAGMENT_NOT_LEAKED(d.content)
        content += d.content
        indexed += d.tool_calls
    content += parser.finish().content
    whole_content, whole_calls = parse_tool_calls(text)
    assert content.strip() == whole_content == "Sure <tool<b>  then  done".strip()
    assert [i for i, _ in indexed] == [0, 1]
    assert [(c.name, c.arguments) for _, c in indexed] == [(c.name, c.arguments) for c in whole_calls]


def OPEN_FRAGMENT_NOT_LEAKED(content):
    return "<tool_call" not in content and "{\"name\"" not in content
