"""MMMU validation split as released on the Hugging Face hub (MMMU/MMMU): one folder per subject
holding validation-*.parquet with columns id, question, options (a list written as a string),
image_1..image_7 ({"bytes", "path"}), answer, question_type."""

import ast
from pathlib import Path

from . import Sample, data_url, mcq_prompt, missing, read_parquet, user_message, vqa_prompt
from ..metrics.choice import letters_for

EXPECTED = ("Expected DIR/<Subject>/validation-*.parquet (e.g. DIR/Art/validation-00000-of-00001.parquet), "
            "the layout of https://huggingface.co/datasets/MMMU/MMMU (download it with "
            "`huggingface-cli download MMMU/MMMU --repo-type dataset --local-dir DIR`). Needs pyarrow.")


def _options(value) -> list[str]:
    if isinstance(value, str):
        value = ast.literal_eval(value) if value.strip() else []
    return [str(v) for v in value]


def load(data_dir: Path) -> list[Sample]:
    files = sorted(data_dir.glob("**/validation-*.parquet"))
    if not files:
        raise missing("mmmu", EXPECTED, f"no validation-*.parquet under {data_dir}.")
    samples = []
    for path in files:
        for row in read_parquet(path):
            images = [data_url(row[f"image_{i}"]["bytes"]) for i in range(1, 8)
                      if row.get(f"image_{i}") and row[f"image_{i}"].get("bytes")]
            record = {"benchmark": "mmmu", "question_type": row["question_type"], "answer": row["answer"],
                      "question": row["question"]}
            if row["question_type"] == "multiple-choice":
                record["options"] = _options(row["options"])
                prompt = mcq_prompt(row["question"], letters_for(record["options"]))
            else:
                prompt = vqa_prompt(row["question"])
            samples.append(Sample(row["id"], user_message(images, prompt), record))
    return samples
