"""Structured output and tool calling: request specs, the tools a request declares, and output parsers."""

from qwenvl.structured.spec import InvalidStructuredOutputError, StructuredOutput
from qwenvl.structured.tool_parser import ToolCall, ToolCallStreamParser, parse_tool_calls
from qwenvl.structured.tools import ToolUse, parse_tool_use

__all__ = ["InvalidStructuredOutputError", "StructuredOutput", "ToolCall",
           "ToolCallStreamParser", "ToolUse", "parse_tool_calls", "parse_tool_use"]
