"""Bound the digits of JSON numbers a grammar admits, where the schema itself leaves them unbounded.

xgrammar's JSON rules admit any number of digits (`[1-9] [0-9]*`, `digits{1, -1}`). A small or unsure model
then writes a 150-digit integer for an unbounded `integer` and spends max_tokens on it. No JSON parser keeps
more than ~16 significant digits of a double anyway, so an integer part and a fraction have at most 16 digits
here and an exponent at most 3. Numbers the schema bounds (minimum and maximum) already get exact, finite rules
from xgrammar and are left alone; strings (their patterns are `Regex(...)` rules) are never touched.
"""

from __future__ import annotations

import re

MAX_DIGITS = 16              # an integer part or a fraction
MAX_EXPONENT_DIGITS = 3

_RULE = re.compile(r"^(\w+) ::= (.*)$")
_DIGIT_BODY = "(([0-9]))"


def bound_numbers(ebnf: str) -> str:
    """The grammar text (xgrammar's printed EBNF) with unbounded digit runs bounded as described above."""
    lines = ebnf.splitlines()
    digit_rules = {m.group(1) for m in map(_RULE.match, lines) if m and m.group(2).strip() == _DIGIT_BODY}
    # an optional leading "[1-9] " (an integer part's first digit, which counts too), a digit rule, {m, -1}
    unbounded = re.compile(r"(\[1-9\] )?\b(" + "|".join(map(re.escape, sorted(digit_rules))) + r")\{(\d+), -1\}") \
        if digit_rules else None
    out = []
    for line in lines:
        m = _RULE.match(line)
        if m is None or "Regex(" in line:
            out.append(line)
            continue
        body = m.group(2).replace("[1-9] [0-9]*", f"[1-9] [0-9]{{0, {MAX_DIGITS - 1}}}")
        if unbounded is not None:
            most = MAX_EXPONENT_DIGITS if "[eE]" in body else MAX_DIGITS
            body = unbounded.sub(lambda d: _bounded(d, most), body)
        out.append(f"{m.group(1)} ::= {body}")
    return "\n".join(out) + "\n"


def _bounded(d: re.Match, most: int) -> str:
    lead, rule, least = d.group(1) or "", d.group(2), int(d.group(3))
    most -= bool(lead)
    return f"{lead}{rule}{{{least}, {max(most, least)}}}"
