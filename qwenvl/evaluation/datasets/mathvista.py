"""MathVista testmini: the original release's testmini.json ({pid: problem}, images/ beside it)
or the Hugging Face parquet (AI4Math/MathVista, data/testmini-*.parquet with decoded_image).
The prompt is the problem's own ``query`` (hint + question + choices), as the official runs use."""

import json
from pathlib import Path

from . import Sample, data_url, file_url, missing, read_parquet, user_message

EXPECTED = ("Expected DIR/testmini.json with the images under DIR/images/, or the parquet layout of "
            "https://huggingface.co/datasets/AI4Math/MathVista (DIR/data/testmini-*.parquet). "
            "See https://github.com/lupantech/MathVista.")
FIELDS = ("question_type", "answer_type", "choices", "precision", "answer", "query")


def _sample(p: dict, image_url: str) -> Sample:
    record = {"benchmark": "mathvista", **{k: p.get(k) for k in FIELDS}}
    if record["choices"] is not None:
        record["choices"] = list(record["choices"])
    return Sample(str(p["pid"]), user_message([image_url], p["query"]), record)


def load(data_dir: Path) -> list[Sample]:
    path = data_dir / "testmini.json"
    if path.is_file():
        problems = json.loads(path.read_text(encoding="utf-8"))
        return [_sample(p, file_url(data_dir / p["image"])) for p in problems.values()]
    files = sorted(data_dir.glob("data/testmini-*.parquet")) + sorted(data_dir.glob("testmini-*.parquet"))
    if not files:
        raise missing("mathvista", EXPECTED, f"neither testmini.json nor testmini-*.parquet in {data_dir}.")
    return [_sample(row, data_url(row["decoded_image"]["bytes"])) for f in files for row in read_parquet(f)]
