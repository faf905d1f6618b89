"""Generated text -> content and tool calls, for a request that declared tools (both APIs share this).

Without tools, or with tool_choice "none", the text is all content. With them, every `<tool_call>` block the
model writes becomes a call, and a request that made a call finishes with reason "tool_calls" (OpenAI's and
DashScope's convention) unless it was cut by max_tokens.
"""

from __future__ import annotations

from ..structured.tool_parser import ToolCall, ToolCallStreamParser, parse_tool_calls
from ..structured.tools import ToolUse


def parses(tools: ToolUse | None) -> bool:
    return tools is not None and tools.parses_calls


def final_finish_reason(finish_reason: str | None, calls: list) -> str | None:
    return "tool_calls" if calls and finish_reason == "stop" else finish_reason


def split_final(tools: ToolUse | None, text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished output; content is None when the answer is only calls."""
    if not parses(tools):
        return text, []
    return parse_tool_calls(text)


class StreamSplitter:
    """Per streamed request: feed each delta, get (content delta, [(index, call)] completed in it)."""

    def __init__(self, tools: ToolUse | None):
        self._parser = ToolCallStreamParser() if parses(tools) else None

    def feed(self, delta: str, finished: bool) -> tuple[str, list[tuple[int, ToolCall]]]:
        if self._parser is None:
            return delta, []
        step = self._parser.feed(delta)
        content, calls = step.content, step.tool_calls
        if finished:
            content += self._parser.finish().content
        return content, calls

    @property
    def calls(self) -> list[ToolCall]:
        return self._parser.calls if self._parser is not None else []


def openai_delta_calls(calls: list[tuple[int, ToolCall]]) -> list[dict]:
    """OpenAI streams each call once complete: index, id, type and the whole function in one delta."""
    return [{"index": i, **call.to_openai()} for i, call in calls]
