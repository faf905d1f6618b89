"""ChartQA test split as released on GitHub (vis-nlp/ChartQA): test/test_human.json and
test/test_augmented.json, lists of {"imgname", "query", "label"}, images in test/png/.
The published number is the mean over both (1,250 questions each)."""

import json
from pathlib import Path

from . import Sample, file_url, missing, user_message, vqa_prompt

EXPECTED = ("Expected DIR/test/test_human.json and DIR/test/test_augmented.json with the charts in "
            "DIR/test/png/ (DIR may also be the test/ folder itself). Get 'ChartQA Dataset' from "
            "https://github.com/vis-nlp/ChartQA.")


def load(data_dir: Path) -> list[Sample]:
    root = data_dir / "test" if (data_dir / "test").is_dir() else data_dir
    samples = []
    for split in ("human", "augmented"):
        path = root / f"test_{split}.json"
        if not path.is_file():
            raise missing("chartqa", EXPECTED, f"{path} not found.")
        for i, item in enumerate(json.loads(path.read_text(encoding="utf-8"))):
            samples.append(Sample(f"{split}_{i}",
                                  user_message([file_url(root / "png" / item["imgname"])], vqa_prompt(item["query"])),
                                  {"benchmark": "chartqa", "answers": [str(item["label"])], "question": item["query"]}))
    return samples
