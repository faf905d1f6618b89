"""Structured output and tool calling: request specs and parsers (engine integration comes next)."""

from qwenvl.structured.spec import InvalidStructuredOutputError, StructuredOutput
from qwenvl.structured.tool_parser import ToolCall, ToolCallStreamParser, parse_tool_calls

__all__ = ["InvalidStructuredOutputError", "StructuredOutput", "ToolCall",
           "ToolCallStreamParser", "parse_tool_calls"]
