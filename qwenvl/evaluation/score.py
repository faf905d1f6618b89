"""Scoring a file of prediction records: one score per record (per circular group for MMBench-CN)
and the aggregate per benchmark."""

import json
import random
from pathlib import Path
from typing import Callable, Iterable, Optional

from .metrics.anls import anls
from .metrics.choice import infer_choice, letters_for
from .metrics.mathvista import mathvista_score
from .metrics.mmmu import mmmu_score
from .metrics.relaxed import relaxed_accuracy
from .metrics.vqa import vqa_accuracy
from .records import BENCHMARKS, read_records

MMMU_SEED = 42  # the MMMU repo seeds `random` with 42 before parsing


def _choices(rec: dict) -> dict[str, str]:
    if isinstance(rec["options"], dict):
        return {k: str(v) for k, v in rec["options"].items() if v is not None}
    return letters_for(rec["options"])


def score_record(rec: dict, rng: random.Random, judge: Optional[Callable] = None) -> float:
    bench, pred = rec["benchmark"], rec["prediction"]
    if bench == "docvqa":
        return anls(pred, rec["answers"])
    if bench == "chartqa":
        return relaxed_accuracy(pred, rec["answers"])
    if bench == "textvqa":
        return vqa_accuracy(pred, rec["answers"])
    if bench in ("ai2d", "mmbench_cn"):
        return float(infer_choice(pred, _choices(rec)) == rec["answer"])
    if bench == "mmmu":
        return mmmu_score(rec, rng)
    if bench == "mathvista":
        return mathvista_score(rec, judge)[0]
    raise ValueError(f"unknown benchmark {bench!r}")


def score_records(records: Iterable[dict], judge: Optional[Callable] = None):
    """Returns (per-record rows [{"id", "benchmark", "score"}], {benchmark: {"score": 0..100, "n"}}).

    MMBench-CN rows are one per circular group (id = g_index), at the place of the group's first
    record; a group scores 1 only if every rotation is answered right.
    """
    rng = random.Random(MMMU_SEED)
    rows: list[dict] = []
    groups: dict = {}
    for rec in records:
        s = score_record(rec, rng, judge)
        if rec["benchmark"] == "mmbench_cn":
            g = rec["g_index"]
            if g not in groups:
                groups[g] = {"id": g, "benchmark": "mmbench_cn", "score": 1.0}
                rows.append(groups[g])
            groups[g]["score"] = min(groups[g]["score"], s)
        else:
            rows.append({"id": rec["id"], "benchmark": rec["benchmark"], "score": s})
    totals: dict = {}
    for row in rows:
        t = totals.setdefault(row["benchmark"], [0.0, 0])
        t[0] += row["score"]
        t[1] += 1
    summary = {b: {"score": 100.0 * totals[b][0] / totals[b][1], "n": totals[b][1]}
               for b in BENCHMARKS if b in totals}
    return rows, summary


def score_file(path: str, judge: Optional[Callable] = None):
    return score_records((rec for _, rec in read_records(path)), judge)


def format_summary(summary: dict) -> str:
    lines = ["| benchmark | n | score |", "|---|---:|---:|"]
    for bench, s in summary.items():
        lines.append(f"| {bench} | {s['n']} | {s['score']:.2f} |")
    return "\n".join(lines)


def write_rows(rows: list[dict], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)     # `--per-record out/scores.jsonl` in a fresh clone
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
