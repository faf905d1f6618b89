"""Turn generated text into OpenAI-style tool calls, whole or as a stream of deltas.

Qwen's chat templates teach the model the hermes form: each call is
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, the rest of the text is content.
A block whose body is not such an object stays in the content: the user sees what the model wrote.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

OPEN, CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str              # a JSON string, as OpenAI's function.arguments
    type: str = "function"

    def to_openai(self) -> dict:
        return {"id": self.id, "type": self.type,
                "function": {"name": self.name, "arguments": self.arguments}}


def _call_from_body(body: str) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):   # some models emit the arguments already as a JSON string
        text = args
    else:
        text = json.dumps(args, ensure_ascii=False)
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=obj["name"], arguments=text)


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """Split finished text into (content or None when only calls, tool calls in order)."""
    parser = ToolCallStreamParser()
    content = parser.feed(text).content + parser.finish().content
    calls = parser.calls
    content = content.strip()
    return (content or None) if calls else content, calls


@dataclass
class StreamDelta:
    content: str = ""
    tool_calls: list[tuple[int, ToolCall]] = None   # (index, call) completed in this step

    def __post_init__(self):
        if self.tool_calls is None:
            self.tool_calls = []


class ToolCallStreamParser:
    """Feed text deltas; get content deltas and each tool call (by index) once its block closes.

    Text that could still be the start of `<tool_call>` is held back, so no partial tag ever
    reaches the client as content.
    """

    def __init__(self):
        self._buf = ""
        self._inside = False
        self.calls: list[ToolCall] = []

    def feed(self, delta: str) -> StreamDelta:
        self._buf += delta
        out = StreamDelta()
        while True:
            if not self._inside:
                at = self._buf.find(OPEN)
                if at < 0:
                    keep = _held_prefix_len(self._buf, OPEN)
                    out.content += self._buf[:len(self._buf) - keep]
                    self._buf = self._buf[len(self._buf) - keep:]
                    return out
                out.content += self._buf[:at]
                self._buf = self._buf[at + len(OPEN):]
                self._inside = True
            end = self._buf.find(CLOSE)
            if end < 0:
                return out
            body, self._buf = self._buf[:end], self._buf[end + len(CLOSE):]
            self._inside = False
            call = _call_from_body(body)
            if call is None:
                out.content += OPEN + body + CLOSE
            else:
                out.tool_calls.append((len(self.calls), call))
                self.calls.append(call)

    def finish(self) -> StreamDelta:
        """End of generation: a block left open (max_tokens cut it before `</tool_call>`) whose body is already
        a complete call is that call, as Hermes-style parsers take it; whatever else is held (a partial tag,
        an unfinished body) is content."""
        out = StreamDelta()
        body = self._buf[:len(self._buf) - _held_prefix_len(self._buf, CLOSE)]     # a cut `</tool_ca`
        call = _call_from_body(body) if self._inside else None
        if call is not None:
            out.tool_calls.append((len(self.calls), call))
            self.calls.append(call)
        else:
            out.content = (OPEN if self._inside else "") + self._buf
        self._buf, self._inside = "", False
        return out


def _held_prefix_len(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
