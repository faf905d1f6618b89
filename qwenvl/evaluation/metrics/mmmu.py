"""MMMU scoring, transcribed from the MMMU repository (MMMU-Benchmark/MMMU, eval/utils/eval_utils.py):
``parse_multi_choice_response`` (random fallback; the repo seeds ``random`` with 42),
``parse_open_response``, ``eval_multi_choice`` and ``eval_open``. Quirks kept are marked "(sic)".
"""

import ast
import random
import re


def get_multi_choice_info(options: list[str]):
    index2ans, all_choices = {}, []
    for i, option in enumerate(options):
        index2ans[chr(ord("A") + i)] = option
        all_choices.append(chr(ord("A") + i))
    return index2ans, all_choices


def parse_multi_choice_response(response: str, all_choices: list[str], index2ans: dict, rng: random.Random):
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = " " + response + " "  # add space to avoid partial match

    index_ans = True
    ans_with_brack = False
    candidates = []
    for choice in all_choices:  # (A) (B) (C) (D)
        if f"({choice})" in response:
            candidates.append(choice)
            ans_with_brack = True
    if len(candidates) == 0:
        for choice in all_choices:  # A B C D
            if f" {choice} " in response:
                candidates.append(choice)
    # no letter: if the response is longer than 5 tokens, look for the option texts
    if len(candidates) == 0 and len(response.split()) > 5:
        for index, ans in index2ans.items():
            if ans.lower() in response.lower():
                candidates.append(index)
                index_ans = False

    if len(candidates) == 0:
        return rng.choice(all_choices)
    if len(candidates) > 1:
        start_indexes = []
        if index_ans:
            if ans_with_brack:
                for can in candidates:
                    start_indexes.append(response.rfind(f"({can})"))
            else:
                for can in candidates:
                    start_indexes.append(response.rfind(f" {can} "))
        else:
            for can in candidates:
                start_indexes.append(response.lower().rfind(index2ans[can].lower()))
        # np.argmax: the first of the largest
        return candidates[max(range(len(start_indexes)), key=lambda i: (start_indexes[i], -i))]
    return candidates[0]


def check_is_number(string: str) -> bool:
    try:
        float(string.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_str(string: str) -> list:
    string = string.strip()
    if check_is_number(string):
        return [round(float(string.replace(",", "")), 2)]
    string = string.lower()
    if len(string) == 1:
        return [" " + string, string + " "]  # avoid trivial matches
    return [string]


def extract_numbers(string: str) -> list[str]:
    pattern_commas = r"-?\b\d{1,3}(?:,\d{3})+\b"
    pattern_scientific = r"-?\d+(?:\.\d+)?[eE][+-]?\d+"
    pattern_simple = r"-?(?:\d+\.\d+|\.\d+|\d+)(?![eE][+-]?\d+)(?![,\d])"
    return (re.findall(pattern_commas, string) + re.findall(pattern_scientific, string)
            + re.findall(pattern_simple, string))


def _get_key_subresponses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    # (sic) the text is already lower-cased, so "(?=[A-Z])" never matches: only newlines split
    sub_responses = re.split(r"\.\s(?=[A-Z])|\n", response)
    indicators_of_keys = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    key_responses = []
    for index, resp in enumerate(sub_responses):
        # the last sentence may be just an equation
        if index == len(sub_responses) - 1:
            indicators_of_keys.extend(["="])
        shortest_key_response = None
        for indicator in indicators_of_keys:
            if indicator in resp:
                tail = resp.split(indicator)[-1].strip()
                if not shortest_key_response:
                    shortest_key_response = tail
                elif len(tail) < len(shortest_key_response):
                    shortest_key_response = tail
        if shortest_key_response:
            if shortest_key_response.strip() not in [":", ",", ".", "!", "?", ";", ":", "'"]:
                key_responses.append(shortest_key_response)
    if len(key_responses) == 0:
        return [response]
    return key_responses


def parse_open_response(response: str) -> list:
    key_responses = _get_key_subresponses(response)
    pred_list = key_responses.copy()
    for resp in key_responses:
        pred_list.extend(extract_numbers(resp))
    normalised = []
    for p in pred_list:
        normalised.extend(normalize_str(p))
    return list(set(normalised))


def eval_multi_choice(gold, pred) -> bool:
    if isinstance(gold, list):
        return any(answer == pred for answer in gold)
    return gold == pred


def eval_open(gold, pred_list: list) -> bool:
    if isinstance(gold, list):
        norm_answers = []
        for answer in gold:
            norm_answers.extend(normalize_str(answer))
    else:
        norm_answers = normalize_str(gold)
    for pred in pred_list:
        if isinstance(pred, str):
            for norm_ans in norm_answers:
                if isinstance(norm_ans, str) and norm_ans in pred:
                    return True
        elif pred in norm_answers:
            return True
    return False


def open_gold(answer):
    """A gold answer written as a list literal ("['24/7', '3.429']") counts as that list."""
    if isinstance(answer, list):
        return [str(a) for a in answer]
    text = str(answer)
    if text.strip().startswith("[") and text.strip().endswith("]"):
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            return text
        if isinstance(value, list):
            return [str(a) for a in value]
    return text


def mmmu_score(record: dict, rng: random.Random) -> float:
    prediction = record["prediction"]
    if record["question_type"] == "multiple-choice":
        index2ans, all_choices = get_multi_choice_info([str(o) for o in record["options"]])
        pred = parse_multi_choice_response(prediction, all_choices, index2ans, rng)
        return float(eval_multi_choice(record["answer"], pred))
    return float(eval_open(open_gold(record["answer"]), parse_open_response(prediction)))
