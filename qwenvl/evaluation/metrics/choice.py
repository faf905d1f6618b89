"""Multiple-choice letter inference without a judge, as VLMEvalKit's ``can_infer`` does it
(open-compass/VLMEvalKit, vlmeval/utils/matching_util.py), used for AI2D and MMBench.

1. option letter: replace each of ``.()[],:;!*#{}`` with a space and split; if exactly one option
   letter is a token and its first appearance is among the last four tokens, that is the answer
   (with no option letter but a bare 'Z' token, or a refusal phrase, the answer is 'Z': none);
2. the case-insensitive pattern "answer is X" (no word boundary: "the answer is a dog" reads A);
3. option text: if the prediction is at most twice as long as all option texts together, the one
   option whose (lower-cased) text it contains.
Otherwise there is no answer (``None``), which scores as wrong.
"""

import re

_SPLIT_CHARS = ".()[],:;!*#{}"
_REJECTIONS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_ANSWER_IS = re.compile(r"answer is ([a-z])", re.IGNORECASE)


def _count_choice(splits: list[str], choices) -> int:
    return sum(1 for c in choices if c in splits)


def infer_option(answer: str, choices: dict[str, str]):
    """Step 1. Returns a letter, 'Z' (explicitly none), or False."""
    if "Failed to obtain answer via API" in answer:
        return False
    for err in _REJECTIONS:
        if err in answer:
            return "Z"
    answer_mod = answer
    for c in _SPLIT_CHARS:
        answer_mod = answer_mod.replace(c, " ")
    splits = [x.strip() for x in answer_mod.split()]
    count = _count_choice(splits, choices)
    if count == 1:
        for ch in choices:
            if ch in splits and splits.index(ch) > len(splits) - 5:
                return ch
    elif count == 0 and _count_choice(splits, {"Z", ""}) == 1:
        return "Z"
    return False


def infer_answer_is(answer: str, choices: dict[str, str]):
    """Step 2."""
    m = _ANSWER_IS.search(answer)
    if m and m.group(1).upper() in choices:
        return m.group(1).upper()
    return False


def infer_text(answer: str, choices: dict[str, str]):
    """Step 3."""
    answer = answer.lower()
    texts = {k: str(v).lower() for k, v in choices.items()}
    if len(answer) > 2 * sum(len(v) for v in texts.values()):
        return False
    cands = [k for k, v in texts.items() if v in answer]
    return cands[0] if len(cands) == 1 else False


def infer_choice(prediction: str, choices: dict[str, str]) -> str | None:
    """The predicted letter, or None when no answer can be read (a refusal gives None too)."""
    prediction = str(prediction)
    for step in (infer_option, infer_answer_is, infer_text):
        got = step(prediction, choices)
        if got:
            return None if got == "Z" and "Z" not in choices else got
    return None


def letters_for(options: list[str]) -> dict[str, str]:
    return {chr(ord("A") + i): str(o) for i, o in enumerate(options)}
