"""MMBench-CN dev split as a TSV (the OpenCompass release, e.g. mmbench_dev_cn_20231003.tsv, or
VLMEvalKit's MMBench_DEV_CN.tsv): columns index, question, hint, A.., answer, image (base64).

Circular evaluation: a row with index i belongs to group i % 1,000,000. VLMEvalKit's files already
hold the rotated copies (index + k * 1e6), whose image may be just the index of the row that holds
the picture; a file with no copies gets the rotations made here, as CircularEval defines them.
"""

import base64
import csv
import sys
from pathlib import Path

from . import Sample, data_url, mcq_prompt, missing, user_message

EXPECTED = ("Expected one TSV in DIR: MMBench_DEV_CN.tsv (VLMEvalKit) or mmbench_dev_cn_*.tsv "
            "(https://github.com/open-compass/MMBench, 'MMBench-CN dev').")
GROUP = 1_000_000
LETTERS = "ABCDEFGHI"


def _blank(v) -> bool:
    return v is None or v.strip() == "" or v.strip().lower() == "nan"


def _rotations(row: dict) -> list[dict]:
    letters = [k for k in LETTERS if not _blank(row.get(k))]
    texts = [row[k] for k in letters]
    out = []
    for k in range(len(letters)):
        r = dict(row, index=str(int(row["index"]) + k * GROUP))
        for i, letter in enumerate(letters):
            r[letter] = texts[(i + k) % len(letters)]
        r["answer"] = letters[(letters.index(row["answer"]) - k) % len(letters)]
        out.append(r)
    return out


def load(data_dir: Path) -> list[Sample]:
    files = sorted(data_dir.glob("MMBench_DEV_CN*.tsv")) + sorted(data_dir.glob("mmbench_dev_cn*.tsv"))
    if not files:
        raise missing("mmbench_cn", EXPECTED, f"no MMBench-CN TSV in {data_dir}.")
    csv.field_size_limit(sys.maxsize)
    with open(files[0], encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if rows and "answer" not in rows[0]:
        raise missing("mmbench_cn", EXPECTED, f"{files[0].name} has no answer column (the test split is scored by OpenCompass).")
    if all(int(r["index"]) < GROUP for r in rows):
        rows = [r for row in rows for r in _rotations(row)]
    images = {int(r["index"]): r["image"] for r in rows if len(r["image"]) > 64}
    samples = []
    for r in rows:
        index = int(r["index"])
        image = r["image"]
        if len(image) <= 64:  # a reference to the row that holds the picture
            image = images[int(image)] if image.strip().isdigit() and int(image) in images else images[index % GROUP]
        options = {k: r[k] for k in LETTERS if k in r and not _blank(r[k])}
        hint = None if _blank(r.get("hint")) else r["hint"]
        record = {"benchmark": "mmbench_cn", "options": options, "answer": r["answer"], "index": index,
                  "g_index": index % GROUP, "question": r["question"]}
        samples.append(Sample(index, user_message([data_url(base64.b64decode(image))],
                                                  mcq_prompt(r["question"], options, hint)), record))
    return samples
