"""Put `tools` and tool-call turns into a conversation the checkpoint's chat template can render.

Qwen2.5-VL / Qwen3-VL templates render tools themselves (hermes form). Qwen2-VL's template knows
no tools, so for it the same system block and turn shapes the tool-aware templates produce are
written into plain messages here: the model sees the prompt format Qwen's text models are trained on.
"""

from __future__ import annotations

import json

_TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
               "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and "
               "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
               "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>")


def template_renders_tools(chat_template: str) -> bool:
    return "tools" in chat_template and "tool_call" in chat_template


def tools_system_block(tools: list[dict]) -> str:
    # Same text and JSON spacing as the templates' `tool | tojson` (json.dumps with ", " and ": ").
    return _TOOLS_HEAD + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + _TOOLS_TAIL


def prepare_tool_messages(messages: list[dict], tools: list[dict] | None,
                          renders_tools: bool) -> list[dict]:
    """Messages ready for the template; for a tool-unaware template, tools and calls become text."""
    if renders_tools:
        # The SDK sends an assistant tool-call turn with content null; templates expect a string.
        return [{**m, "content": ""} if m.get("content") is None else m for m in messages]
    out: list[dict] = []
    for m in messages:
        if m.get("role") == "tool":
            block = "<tool_response>\n" + _text(m.get("content")) + "\n</tool_response>"
            if out and out[-1].get("_tool_turn"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_turn": True})
        elif m.get("role") == "assistant" and m.get("tool_calls"):
            out.append({"role": "assistant", "content": _assistant_text(m)})
        else:
            out.append(dict(m))
    for m in out:
        m.pop("_tool_turn", None)
    if tools:
        block = tools_system_block(tools)
        if out and out[0].get("role") == "system":
            out[0]["content"] = _text(out[0].get("content")) + "\n\n" + block
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def _assistant_text(m: dict) -> str:
    parts = [_text(m.get("content"))] if m.get("content") else []
    for call in m["tool_calls"]:
        fn = call.get("function", call)
        args = fn.get("arguments", {})
        args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        parts.append('<tool_call>\n{"name": "' + fn["name"] + '", "arguments": ' + args + "}\n</tool_call>")
    return "\n".join(parts)


def _text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))
