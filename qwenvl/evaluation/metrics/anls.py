"""DocVQA ANLS, as the DocVQA challenge's evaluation script (rrc.cvc.uab.es, Task 1) computes it.

Per answer: the edit distance between the lower-cased, stripped, whitespace-collapsed strings,
divided by the longer of the two RAW strings' lengths taken as ``len(s.upper())`` (the script's
own quirk: 'ß'.upper() == 'SS', so such characters count twice). The question scores
``1 - min(normalised distances)``; a score below the 0.5 threshold becomes 0 (0.5 itself is kept).
"""

THRESHOLD = 0.5


def levenshtein(a: str, b: str) -> int:
    """Plain edit distance (insert, delete, substitute each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _normalise(s: str) -> str:
    return " ".join(s.strip().lower().split())


def anls(prediction: str, answers: list[str], threshold: float = THRESHOLD) -> float:
    values = []
    det = _normalise(prediction)
    for answer in answers:
        dist = levenshtein(_normalise(answer), det)
        length = max(len(answer.upper()), len(prediction.upper()))
        values.append(0.0 if length == 0 else float(dist) / float(length))
    score = 1 - min(values)
    if score < threshold:
        score = 0
    return float(score)
