"""AI2D as released by AllenAI (ai2d-all.zip): questions/{image}.json
{"imageName", "questions": {text: {"answerTexts": [...], "correctAnswer": i, "questionId"}}},
images/{image}; the test split is the image ids listed in ai2d_test_ids.csv (when present)."""

import json
from pathlib import Path

from . import Sample, file_url, mcq_prompt, missing, user_message
from ..metrics.choice import letters_for

EXPECTED = ("Expected DIR/questions/*.json and DIR/images/ (from ai2d-all.zip) and, to restrict to "
            "the test split, DIR/ai2d_test_ids.csv. Get them from "
            "https://prior.allenai.org/projects/diagram-understanding.")


def load(data_dir: Path) -> list[Sample]:
    qdir = data_dir / "questions"
    if not qdir.is_dir():
        raise missing("ai2d", EXPECTED, f"{qdir} not found.")
    test_ids = None
    ids_file = data_dir / "ai2d_test_ids.csv"
    if ids_file.is_file():
        test_ids = {line.strip() for line in ids_file.read_text().splitlines() if line.strip()}
    samples = []
    for path in sorted(qdir.glob("*.json"), key=lambda p: (len(p.name), p.name)):
        ann = json.loads(path.read_text(encoding="utf-8"))
        image_name = ann["imageName"]
        if test_ids is not None and image_name.split(".")[0] not in test_ids:
            continue
        for question, q in ann["questions"].items():
            options = [str(t) for t in q["answerTexts"]]
            prompt = mcq_prompt(question, letters_for(options))
            samples.append(Sample(q["questionId"], user_message([file_url(data_dir / "images" / image_name)], prompt),
                                  {"benchmark": "ai2d", "options": options, "answer": chr(65 + int(q["correctAnswer"])),
                                   "question": question}))
    return samples
