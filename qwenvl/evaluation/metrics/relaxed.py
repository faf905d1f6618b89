"""ChartQA relaxed accuracy, transcribed from pix2struct (google-research/pix2struct, metrics.py).

``relaxed_correctness(target, prediction)``: the tolerance is relative to the TARGET; a value
ending in '%' is divided by 100; both must parse as Python floats and the target must be non-zero
for the 5% tolerance, otherwise a case-insensitive exact compare (no stripping). A question
scores the max over its gold answers.
"""

from typing import Optional


def _to_float(text: str) -> Optional[float]:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(target: str, prediction: str, max_relative_change: float = 0.05) -> bool:
    prediction_float = _to_float(prediction)
    target_float = _to_float(target)
    if prediction_float is not None and target_float:
        relative_change = abs(prediction_float - target_float) / abs(target_float)
        return relative_change <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, answers: list[str]) -> float:
    return float(max(relaxed_correctness(t, prediction) for t in answers))
