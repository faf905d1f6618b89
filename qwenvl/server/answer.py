"""Generated text -> what the APIs answer with: reasoning, content and tool calls (both APIs share this).

A Thinking model writes `<think>reasoning</think>answer` (the template may open the block in the prompt);
the reasoning becomes `reasoning_content`. In the answer, with tools declared and tool_choice not "none",
every `<tool_call>` block becomes a call, and a request that made a call finishes with "tool_calls"
(OpenAI's and DashScope's convention) unless max_tokens cut it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..answers.reasoning import ReasoningStream, split_reasoning
from ..structured.tool_parser import ToolCall, ToolCallStreamParser, parse_tool_calls
from ..structured.tools import ToolUse


def _parses(tools: ToolUse | None) -> bool:
    return tools is not None and tools.parses_calls


def _finish(finish_reason: str | None, calls: list) -> str | None:
    return "tool_calls" if calls and finish_reason == "stop" else finish_reason


@dataclass
class Answer:
    reasoning: str | None                   # None: the model wrote no reasoning block
    content: str | None                     # None when the answer is only tool calls
    calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None


def final_answer(text: str, finish_reason: str | None, tools: ToolUse | None, reasoning_opened: bool) -> Answer:
    split = split_reasoning(text, reasoning_opened)
    content, calls = parse_tool_calls(split.content) if _parses(tools) else (split.content, [])
    return Answer(split.reasoning, content, calls, _finish(finish_reason, calls))


@dataclass
class AnswerDelta:
    reasoning: str = ""
    content: str = ""
    calls: list[tuple[int, ToolCall]] = field(default_factory=list)    # (index, call) completed in this step


class AnswerStream:
    """Per streamed choice: feed each text delta, get the reasoning / content deltas and completed calls."""

    def __init__(self, tools: ToolUse | None, reasoning_opened: bool):
        self._reasoning = ReasoningStream(reasoning_opened)
        self._tools = ToolCallStreamParser() if _parses(tools) else None

    def feed(self, delta: str, finished: bool) -> AnswerDelta:
        reasoning, content = self._reasoning.feed(delta)
        if finished:
            more_reasoning, more_content = self._reasoning.finish()
            reasoning, content = reasoning + more_reasoning, content + more_content
        if self._tools is None:
            return AnswerDelta(reasoning, content)
        step = self._tools.feed(content)
        out = AnswerDelta(reasoning, step.content, list(step.tool_calls))
        if finished:
            end = self._tools.finish()
            out.content += end.content
            out.calls += end.tool_calls
        return out

    @property
    def calls(self) -> list[ToolCall]:
        return self._tools.calls if self._tools is not None else []

    def finish_reason(self, finish_reason: str | None) -> str | None:
        return _finish(finish_reason, self.calls)


def openai_delta_calls(calls: list[tuple[int, ToolCall]]) -> list[dict]:
    """OpenAI streams each call once complete: index, id, type and the whole function in one delta."""
    return [{"index": i, **call.to_openai()} for i, call in calls]
