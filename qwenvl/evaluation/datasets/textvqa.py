"""TextVQA 0.5.1 validation split: TextVQA_0.5.1_val.json {"data": [{"question_id", "image_id",
"question", "answers": [10]}]}, images train_images/{image_id}.jpg (train_val_images.zip)."""

import json
from pathlib import Path

from . import Sample, file_url, missing, user_message, vqa_prompt

EXPECTED = ("Expected DIR/TextVQA_0.5.1_val.json and the images in DIR/train_images/ (the validation "
            "images ship in train_val_images.zip). Get both from https://textvqa.org/dataset.")


def load(data_dir: Path) -> list[Sample]:
    path = data_dir / "TextVQA_0.5.1_val.json"
    if not path.is_file():
        raise missing("textvqa", EXPECTED, f"{path} not found.")
    samples = []
    for item in json.loads(path.read_text(encoding="utf-8"))["data"]:
        image = data_dir / "train_images" / f"{item['image_id']}.jpg"
        samples.append(Sample(item["question_id"], user_message([file_url(image)], vqa_prompt(item["question"])),
                              {"benchmark": "textvqa", "answers": item["answers"], "question": item["question"]}))
    return samples
