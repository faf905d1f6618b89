"""DocVQA (Single Page, Task 1) validation split as released by the RRC: val_v1.0.json
{"data": [{"questionId", "question", "image": "documents/x.png", "answers": [...]}, ...]}."""

import json
from pathlib import Path

from . import Sample, file_url, missing, user_message, vqa_prompt

EXPECTED = ("Expected DIR/val_v1.0.json (or val_v1.0_withQT.json, or the same under DIR/val/) with the "
            "page images under documents/ beside it. Get them from https://rrc.cvc.uab.es/?ch=17 "
            "(Downloads: Task 1 - Single Page Document VQA, validation set).")
NAMES = ("val_v1.0.json", "val_v1.0_withQT.json")


def load(data_dir: Path) -> list[Sample]:
    candidates = [data_dir / n for n in NAMES] + [data_dir / "val" / n for n in NAMES]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise missing("docvqa", EXPECTED, f"no annotation file in {data_dir}.")
    samples = []
    for item in json.loads(path.read_text(encoding="utf-8"))["data"]:
        if "answers" not in item:
            raise missing("docvqa", EXPECTED, f"{path.name} has no answers (the test split is scored on the RRC site).")
        image = path.parent / item["image"]
        samples.append(Sample(item["questionId"], user_message([file_url(image)], vqa_prompt(item["question"])),
                              {"benchmark": "docvqa", "answers": item["answers"], "question": item["question"]}))
    return samples
