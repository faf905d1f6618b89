"""Tools and tool turns render identically through a tool-aware template and the Qwen2-VL fallback."""

from pathlib import Path

import jinja2
import pytest

from qwenvl.structured.tool_prompt import prepare_tool_messages, template_renders_tools

TEMPLATES = Path(__file__).resolve().parents[1] / "qwenvl" / "assets" / "chat_templates"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
]


def render(name, messages, tools):
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x: __import__("json").dumps(x, ensure_ascii=False)
    tpl = env.from_string((TEMPLATES / name).read_text())
    return tpl.render(messages=messages, tools=tools, add_generation_prompt=True)


def test_which_templates_render_tools():
    assert template_renders_tools((TEMPLATES / "qwen3_vl_chat_template.jinja").read_text())
    assert not template_renders_tools((TEMPLATES / "qwen2_vl_chat_template.jinja").read_text())


def test_qwen2_vl_fallback_produces_the_tool_aware_templates_prompt():
    aware = render("qwen3_vl_chat_template.jinja", prepare_tool_messages(CONV, TOOLS, True), TOOLS)
    fallback = render("qwen2_vl_chat_template.jinja", prepare_tool_messages(CONV, TOOLS, False), None)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in aware
    assert "<tool_response>\nrain\n</tool_response>" in aware
    assert fallback == aware


def test_null_content_is_not_passed_to_a_tool_aware_template():
    msgs = prepare_tool_messages(CONV, TOOLS, True)
    assert msgs[2]["content"] == "" and CONV[2]["content"] is None
