"""A request's `tools` and `tool_choice`, checked once, and what they ask of prompt, decoding and output.

OpenAI's meaning, which DashScope shares:
  "auto"      the tools are in the prompt; the model may call them; calls are parsed from the output
  "none"      the tools are in the prompt, but the model is not to call them: the output stays text
  "required"  the model must call one of the tools: the grammar forces one `<tool_call>` block
  {"type": "function", "function": {"name": X}}   the grammar forces a call to X
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field

from .limits import SchemaLimits, check_schema_limits
from .spec import InvalidStructuredOutputError, StructuredOutput, check_schema

CHOICES = ("auto", "none", "required")
# OpenAI's rule for function names. It also keeps a name from holding `</tool_call>` or a quote, which would
# end the forced call's block early or break its JSON.
NAME_RULE = re.compile(r"[a-zA-Z0-9_-]{1,64}")


@dataclass(frozen=True)
class ToolUse:
    tools: tuple                       # the declared tools, OpenAI shape, as given
    choice: str = "auto"               # "auto" | "none" | "required" | "function"
    name: str | None = None            # the forced tool's name when choice == "function"
    limits: SchemaLimits | None = field(default=None, compare=False)   # for the forced call's schema

    @property
    def parses_calls(self) -> bool:
        return self.choice != "none"

    def forced_output(self) -> StructuredOutput | None:
        """The grammar that forces a call, or None when the model chooses freely."""
        if self.choice == "required":
            return StructuredOutput.tool_call(list(self.tools), limits=self.limits)
        if self.choice == "function":
            return StructuredOutput.tool_call(list(self.tools), self.name, limits=self.limits)
        return None

    def constrain(self, params):
        """`params` (SamplingParams) with the forcing grammar, when the choice forces a call."""
        forced = self.forced_output()
        if forced is None:
            return params
        if params.structured is not None:
            raise InvalidStructuredOutputError(
                "tool_choice: forcing a tool call cannot be combined with response_format / structured output")
        return dataclasses.replace(params, structured=forced)


def parse_tool_use(tools, tool_choice, where: str = "", limits: SchemaLimits | None = None) -> ToolUse | None:
    """Check `tools` / `tool_choice` as a client sent them; None when no tools are declared. `limits` bound each
    tool's parameters schema (and later the forced call's grammar).

    Raises InvalidStructuredOutputError whose message starts with the offending field's name."""
    if tools is None:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidStructuredOutputError(f"{where}tool_choice: {tool_choice!r} needs {where}tools")
        return None
    if not isinstance(tools, list):
        raise InvalidStructuredOutputError(f"{where}tools: must be a list of tools, got {type(tools).__name__}")
    names = [_check_tool(tool, f"{where}tools[{i}]", limits) for i, tool in enumerate(tools)]
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise InvalidStructuredOutputError(f"{where}tools[{i}].function.name: {name!r} is declared twice "
                                               f"(also tools[{seen[name]}]); tool names must be unique")
        seen[name] = i
    if not tools:
        return None if tool_choice in (None, "none", "auto") else _no_tools(where)
    if tool_choice is None or tool_choice in CHOICES:
        return ToolUse(tuple(tools), tool_choice or "auto", limits=limits)
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise InvalidStructuredOutputError(
                f"{where}tool_choice: an object must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        if name not in names:
            raise InvalidStructuredOutputError(
                f"{where}tool_choice: names {name!r}, which is not among the declared tools {names}")
        return ToolUse(tuple(tools), "function", name, limits=limits)
    raise InvalidStructuredOutputError(
        f"{where}tool_choice: must be one of {', '.join(CHOICES)} or a function object, got {tool_choice!r}")


def _no_tools(where: str):
    raise InvalidStructuredOutputError(f"{where}tool_choice: forcing a call needs at least one tool in {where}tools")


def _check_tool(tool, where: str, limits: SchemaLimits | None) -> str:
    if not isinstance(tool, dict):
        raise InvalidStructuredOutputError(f"{where}: must be an object, got {type(tool).__name__}")
    if tool.get("type", "function") != "function":
        raise InvalidStructuredOutputError(f"{where}.type: only 'function' tools exist, got {tool.get('type')!r}")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise InvalidStructuredOutputError(f"{where}.function: required, an object with name and parameters")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidStructuredOutputError(f"{where}.function.name: required, a non-empty string")
    if not NAME_RULE.fullmatch(name):
        raise InvalidStructuredOutputError(f"{where}.function.name: {name[:80]!r} is not a valid function name; use "
                                           "1 to 64 letters, digits, underscores or dashes (^[a-zA-Z0-9_-]{1,64}$)")
    params = fn.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise InvalidStructuredOutputError(f"{where}.function.parameters: must be a JSON schema object")
    if params is not None:
        text = json.dumps(params, separators=(",", ":"))
        try:
            if limits is not None:              # the size first: the schema check below is slow on a huge one
                check_schema_limits(text, limits)
            check_schema(text)
        except InvalidStructuredOutputError as e:
            message = str(e).replace("invalid json_schema", "invalid schema")
            raise InvalidStructuredOutputError(f"{where}.function.parameters: {message}",
                                               f"{where}.function.parameters") from None
    return name
