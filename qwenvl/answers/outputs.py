"""What a request gives back, incrementally while it runs and whole when it finishes."""

from __future__ import annotations

from dataclasses import dataclass, field

from .grounding import parse_boxes_multi
from .reasoning import split_reasoning


@dataclass
class RequestOutput:
    request_id: str
    text: str = ""                         # all text so far (stop strings cut, special tokens dropped)
    delta_text: str = ""                   # text new since this request's previous output
    token_ids: list[int] = field(default_factory=list)   # generated ids, the final eos/stop token included
    finish_reason: str | None = None       # None while running; "stop" | "length" | "abort"
    logprobs: list[dict[int, float]] | None = None
    boxes: list[dict] = field(default_factory=list)      # grounding boxes in original-image pixels (final)
    prompt_tokens: int = 0
    image_tokens: int = 0                  # image pad tokens in the prompt
    video_tokens: int = 0                  # video pad tokens in the prompt
    cached_tokens: int = 0                 # prompt tokens whose KV came from the prefix cache
    error: str | None = None               # why the engine gave up on the request, if it did
    tool_calls: list = field(default_factory=list)       # ToolCall list, parsed when the request declared tools

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def answer_boxes(text: str, family: str, vision: list, reasoning_opened: bool = False) -> list[dict]:
    """The grounding boxes of a finished answer, in original-image pixels, from the answer only: a Thinking
    model's reasoning may draft boxes it then rejects. `vision` is the prompt's VisionItems."""
    images = [v for v in vision if v.kind == "image"]
    answer = split_reasoning(text, reasoning_opened).content
    if not images or not answer:
        return []
    return parse_boxes_multi(answer, family, [v.input_size for v in images], [v.original_size for v in images])
