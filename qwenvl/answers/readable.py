"""Answers for people: grounding markers as **label** `[(x1,y1),(x2,y2)]`, no raw <|...|> tags; shared by the
web demo and `qwenvl chat`'s interactive mode, whole or as a stream."""

from __future__ import annotations

import re

_REF = re.compile(r"<\|object_ref_start\|>(.*?)<\|object_ref_end\|>", re.S)
_BOX = re.compile(r"<\|box_start\|>(.*?)<\|box_end\|>", re.S)
_QUAD = re.compile(r"<\|quad_start\|>(.*?)<\|quad_end\|>", re.S)
_MARKER = re.compile(r"<\|[a-z_]+\|>")
_SPANS = (("<|object_ref_start|>", "<|object_ref_end|>"), ("<|box_start|>", "<|box_end|>"),
          ("<|quad_start|>", "<|quad_end|>"))


def readable(text: str) -> str:
    """The answer for people: grounding markers become **label** `[(x1,y1),(x2,y2)]`; no raw tags (an
    unfinished marker at the end of a stream is hidden until it completes)."""
    text = _REF.sub(lambda m: f"**{m.group(1).strip()}** ", text)
    text = _BOX.sub(lambda m: f"`[{m.group(1).strip()}]`", text)
    text = _QUAD.sub(lambda m: f"`[{m.group(1).strip()}]`", text)
    text = _MARKER.sub("", text)
    cut = text.rfind("<|")
    if cut != -1 and "|>" not in text[cut:]:
        text = text[:cut]
    return text.strip()


class ReadableStream:
    """Turns a growing answer into the readable text to print next: a grounding span is held back until it
    closes (its label and box then print as one piece), so what is printed is never taken back."""

    def __init__(self):
        self.shown = ""

    def push(self, text: str, final: bool = False) -> str:
        """`text`: the whole answer so far; returns what to print now."""
        if not final:
            open_at = [i for start, end in _SPANS if (i := text.rfind(start)) != -1 and end not in text[i:]]
            text = text[:min(open_at)] if open_at else text.removesuffix("<")   # "<" may start a marker
        now = readable(text)
        if not now.startswith(self.shown):     # rewritten (not expected): print the rest once it is final
            return "\n" + now if final else ""
        new, self.shown = now[len(self.shown):], now
        return new
