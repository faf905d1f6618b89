"""When generation stops. Pure helpers, no torch.

Token-level stops (checked by the scheduler after each sampled token):
  * a token in `params.stop_token_ids`, or an eos token unless `params.ignore_eos` -> "stop"
  * `params.max_tokens` output tokens -> "length"
  * neither stop above ends generation within the first `params.min_tokens` output tokens (the sampler
    does not draw them there either, see Sampler); stop strings wait as long (the engine's _decide)
The stop token stays in `token_ids`; the text never shows it (the detokeniser drops special tokens).

Text-level stops (checked by the engine on the detokenised output): the first occurrence of any
`params.stop` string ends generation with "stop"; the text is cut just before it.
"""

from __future__ import annotations

from typing import Iterable


def check_stop_token(token_id: int, num_output_tokens: int, params, eos_token_ids: Iterable[int] = ()) -> str | None:
    """Finish reason after appending `token_id` as output token number `num_output_tokens`, or None."""
    if num_output_tokens > params.min_tokens:
        if token_id in params.stop_token_ids:
            return "stop"
        if not params.ignore_eos and token_id in eos_token_ids:
            return "stop"
    if num_output_tokens >= params.max_tokens:
        return "length"
    return None


def find_stop_string(text: str, stop: Iterable[str], num_new_chars: int | None = None) -> int | None:
    """Index in `text` where the earliest stop string begins, or None. With `num_new_chars`, only
    matches that end inside the last `num_new_chars` characters are looked for (the rest of the text
    was checked on earlier tokens), so the scan per token stays short."""
    best = None
    for s in stop:
        if not s:
            continue
        lo = 0 if num_new_chars is None else max(0, len(text) - num_new_chars - len(s) + 1)
        i = text.find(s, lo)
        if i != -1 and (best is None or i < best):
            best = i
    return best


def check_stop(seq, new_token: int, text: str, stop_strings: Iterable[str] = (), eos_token_ids: Iterable[int] = (),
               num_new_chars: int | None = None) -> tuple[str | None, str]:
    """Everything in one call: (finish reason or None, text to show). `seq` has already had
    `new_token` appended; `text` is the detokenised output so far (special tokens dropped)."""
    stop_strings = tuple(stop_strings) or tuple(seq.params.stop)
    may_stop = seq.num_output_tokens > seq.params.min_tokens
    i = find_stop_string(text, stop_strings, num_new_chars) if may_stop else None
    if i is not None:
        return "stop", text[:i]
    return check_stop_token(new_token, seq.num_output_tokens, seq.params, eos_token_ids), text


def held_back_chars(text: str, stop: Iterable[str]) -> int:
    """How many trailing characters a streaming client must not see yet because they could be the
    start of a stop string."""
    n = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n
