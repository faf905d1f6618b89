"""Split a Thinking model's output into its reasoning and its answer.

Qwen3 Thinking checkpoints write `<think>reasoning</think>answer`. Their chat templates often open the
`<think>` block in the prompt itself, so the generated text may start inside the reasoning with no opening
tag; `opened_in_prompt` says so. Output cut off before `</think>` (max_tokens) is all reasoning.
"""
from __future__ import annotations

from dataclasses import dataclass

OPEN, CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class Split:
    reasoning: str | None     # None: the output held no reasoning block at all
    content: str


def split_reasoning(text: str, opened_in_prompt: bool = False) -> Split:
    """Whole output -> reasoning and answer; the answer is what follows `</think>` (leading newlines dropped)."""
    body = text.lstrip()
    started = body.startswith(OPEN)
    if started:
        body = body[len(OPEN):]
    elif not opened_in_prompt and CLOSE not in text:
        return Split(None, text)                    # a plain answer: no reasoning block anywhere
    else:
        body = text
    head, sep, tail = body.partition(CLOSE)
    if not sep:                                     # truncated inside the reasoning: no answer yet
        return Split(head.strip("\n"), "")
    return Split(head.strip("\n"), tail.lstrip("\n"))


def prompt_opens_reasoning(prompt_text: str) -> bool:
    """True when the rendered prompt ends inside an unclosed `<think>` block (the template opened it)."""
    return prompt_text.rfind(OPEN) > prompt_text.rfind(CLOSE)


class ReasoningStream:
    """Incremental split of streamed text: `feed(delta)` -> (reasoning_delta, content_delta).

    A tag may arrive split over deltas, so text that could be the start of a tag is held back until the
    next delta (or `finish()`) decides it. Deltas are returned as "" when there is nothing to emit.
    """

    def __init__(self, opened_in_prompt: bool = False):
        self._in_reasoning = opened_in_prompt
        self._seen_start = opened_in_prompt     # a leading `<think>` is only recognised at the very start
        self._pending = ""
        self._after_close = False               # drop the newlines right after `</think>`
        self._reasoning_begun = False           # drop the newlines right after `<think>`

    def feed(self, delta: str) -> tuple[str, str]:
        text = self._pending + delta
        self._pending = ""
        reasoning, content = [], []
        while text:
            if not self._seen_start:
                stripped = text.lstrip()
                if OPEN.startswith(stripped) and len(stripped) < len(OPEN):
                    self._pending = text            # could still become `<think>`
                    break
                self._seen_start = True
                if stripped.startswith(OPEN):
                    self._in_reasoning = True
                    text = stripped[len(OPEN):]
                continue
            if not self._in_reasoning:
                if self._after_close:
                    text = text.lstrip("\n")
                    if not text:
                        break
                    self._after_close = False
                content.append(text)
                break
            if not self._reasoning_begun:
                text = text.lstrip("\n")
                if not text:
                    break
                self._reasoning_begun = not CLOSE.startswith(text[:len(CLOSE)])
            idx = text.find(CLOSE)
            if idx >= 0:
                reasoning.append(text[:idx].rstrip("\n"))
                self._in_reasoning, self._after_close = False, True
                text = text[idx + len(CLOSE):]
                continue
            keep = _partial_suffix(text, CLOSE)
            # trailing newlines may precede `</think>` and be stripped then: hold them back too
            cut = len(text) - keep
            while cut > 0 and text[cut - 1] == "\n":
                cut -= 1
            reasoning.append(text[:cut])
            self._pending = text[cut:]
            break
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """End of stream: release held-back text where it belongs."""
        text, self._pending = self._pending, ""
        if self._in_reasoning:
            return text.rstrip("\n"), ""
        return "", text


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
