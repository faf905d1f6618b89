"""MathVista scoring, transcribed from the MathVista repository (lupantech/MathVista,
evaluation/calculate_score.py: ``normalize_extracted_answer``, ``get_most_similar``, ``safe_equal``;
evaluation/extract_answer.py: the rule-based steps before the LLM extractor).

When a record carries no ``extraction``, ``extract_answer`` runs the official rule-based steps
(empty response, exact choice, int/float parse, the quick "The answer is "..."." pattern) and, in
place of the GPT-4 extractor, either an optional LLM judge (``judge`` callable) or a documented
heuristic of our own (``_heuristic``): an option letter, the last number, the last [...] list.
"""

import re
from typing import Callable, Optional

from .anls import levenshtein


def get_most_similar(prediction: str, choices: list) -> str:
    distances = [levenshtein(prediction, str(choice)) for choice in choices]
    return choices[distances.index(min(distances))]


def normalize_extracted_answer(extraction, choices, question_type, answer_type, precision):
    if question_type == "multi_choice":
        if isinstance(extraction, str):
            extraction = extraction.strip()
        else:
            try:
                extraction = str(extraction)
            except Exception:
                extraction = ""
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)  # "(A) text" -> "A"
        if len(letter) > 0:
            extraction = letter[0].upper()
        sequential_characters = [chr(ord("A") + i) for i in range(len(choices))]
        if extraction in sequential_characters:
            return choices[sequential_characters.index(extraction)]
        return get_most_similar(extraction, choices)
    if answer_type == "integer":
        try:
            return str(int(float(extraction)))
        except Exception:
            return None
    if answer_type == "float":
        try:
            return str(round(float(extraction), int(precision)))
        except Exception:
            return None
    if answer_type == "list":
        try:
            return str(extraction)
        except Exception:
            return None
    return extraction


def safe_equal(prediction, answer) -> bool:
    try:
        return bool(prediction == answer)
    except Exception:
        return False


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _heuristic(response: str, problem: dict) -> str:
    """Our stand-in for the GPT-4 extractor when no judge is configured."""
    text = response.strip()
    if problem["question_type"] == "multi_choice":
        m = re.search(r"answer is:?\s*\(?([A-Za-z])\)?(?:$|[\s.,:;)])", text)
        if m:
            return m.group(1).upper()
        letters = [chr(ord("A") + i) for i in range(len(problem.get("choices") or []))]
        m = re.match(r"\(?([A-Z])(?:\)|[.:]|$)", text)  # "B", "B.", "(B) text", "B: text"
        if m and m.group(1) in letters:
            return m.group(1)
        return text
    if problem["answer_type"] in ("integer", "float"):
        numbers = _NUMBER.findall(text)
        return numbers[-1].replace(",", "") if numbers else text
    if problem["answer_type"] == "list":
        lists = re.findall(r"\[[^\[\]]*\]", text)
        return lists[-1] if lists else text
    return text


def extract_answer(response: str, problem: dict, judge: Optional[Callable[[str, dict], str]] = None):
    if response == "":
        return ""
    choices = problem.get("choices") or []
    if problem["question_type"] == "multi_choice" and response in choices:
        return response
    if problem["answer_type"] == "integer":
        try:
            return str(int(response))
        except ValueError:
            pass
    if problem["answer_type"] == "float":
        try:
            return str(float(response))
        except ValueError:
            pass
    result = re.search(r'The answer is "(.*)"\.', response)  # the official quick extraction
    if result:
        return result.group(1)
    if judge is not None:
        return judge(response, problem)
    return _heuristic(response, problem)


def mathvista_score(record: dict, judge=None) -> tuple[float, object]:
    """Returns (score, normalised prediction)."""
    if "extraction" in record and record["extraction"] is not None:
        extraction = record["extraction"]
    else:
        extraction = extract_answer(record["prediction"], record, judge)
    prediction = normalize_extracted_answer(extraction, record.get("choices"), record["question_type"],
                                            record["answer_type"], record.get("precision"))
    answer = record["answer"]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)  # the official files hold answers as strings
    return float(safe_equal(prediction, answer)), prediction


JUDGE_PROMPT = """Please read the following example. Then extract the answer from the model response and type it at the end of the prompt.

Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end.
Question: Which number is missing?

Model response: The number missing in the sequence is 14.

Extracted answer: 14

Hint: Please answer the question requiring a floating-point number with one decimal place and provide the final value, e.g., 1.2, 1.3, 1.4, at the end.
Question: What is the fraction of females facing the camera?

Model response: The fraction of females facing the camera is 0.6, which means that six out of ten females in the group are facing the camera.

Extracted answer: 0.6

Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.
Question: Between which two years does the line graph saw its maximum peak?
Choices:
(A) [1850, 1860]
(B) [1860, 1870]
(C) [1870, 1880]
(D) [1880, 1890]

Model response: The line graph saw its maximum peak between 1870 and 1880.

Extracted answer: (C)

"""


def make_openai_judge(base_url: str, model: str, api_key: str | None = None, http_client=None):
    """An LLM extractor through any OpenAI-compatible endpoint (off unless asked for)."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", http_client=http_client)

    def judge(response: str, problem: dict) -> str:
        query = problem.get("query") or problem.get("question") or ""
        prompt = f"{JUDGE_PROMPT}{query}\n\nModel response: {response}\n\nExtracted answer: "
        out = client.chat.completions.create(model=model, temperature=0.0, max_tokens=64,
                                             messages=[{"role": "user", "content": prompt}])
        return (out.choices[0].message.content or "").strip()

    return judge
