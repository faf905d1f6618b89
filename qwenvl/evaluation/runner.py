"""Running a benchmark: samples -> predict(messages) -> one JSONL record per sample, appended and
flushed as each answer arrives, so a killed run resumes where it stopped."""

import json
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Optional

from tqdm import tqdm

from .datasets import Sample, load

Predict = Callable[[list], str]


def _key(i) -> str:
    return json.dumps(i)


def read_done(path: Path) -> set:
    """Ids already answered in `path`. A torn last line (killed mid-write) is cut off."""
    done: set = set()
    if not path.exists():
        return done
    raw = path.read_bytes()
    good = 0
    for line in raw.splitlines(keepends=True):
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if line.strip() and line.endswith(b"\n"):
                raise ValueError(f"{path}: a line that is not JSON before the end; move the file aside") from None
            break
        if isinstance(rec, dict) and "id" in rec:
            done.add(_key(rec["id"]))
        good += len(line)
    if good < len(raw):
        with open(path, "r+b") as f:
            f.truncate(good)
    return done


def count_answered(samples: list[Sample], out_path) -> int:
    """How many of `samples` already have a record in `out_path` (what a rerun resumes from)."""
    done = read_done(Path(out_path))
    return sum(1 for s in samples if _key(s.id) in done)


def run_samples(samples: list[Sample], predict: Predict, out_path, *, concurrency: int = 1,
                limit: Optional[int] = None, progress: bool = True) -> dict:
    """Answers every sample not yet in `out_path` (JSONL). Returns {"done", "new", "total"}."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if limit is not None:
        samples = samples[:limit]
    done = read_done(out_path)
    todo = [s for s in samples if _key(s.id) not in done]
    lock = threading.Lock()
    bar = tqdm(total=len(samples), initial=len(samples) - len(todo), disable=not progress,
               desc=samples[0].record["benchmark"] if samples else "eval", unit="q")

    def one(sample: Sample) -> None:
        prediction = predict(sample.messages)
        if not isinstance(prediction, str):
            raise TypeError(f"predict returned {type(prediction).__name__} for id {sample.id!r}, expected str")
        rec = {"id": sample.id, **sample.record, "prediction": prediction}
        line = json.dumps(rec, ensure_ascii=False) + "\n"
        with lock:
            with open(out_path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
            bar.update(1)

    try:
        if concurrency <= 1:
            for s in todo:
                one(s)
        else:
            with ThreadPoolExecutor(concurrency) as pool:
                pending = {pool.submit(one, s) for s in todo}
                try:
                    while pending:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            fut.result()  # first failure stops the run; what is written stays
                except BaseException:
                    for fut in pending:
                        fut.cancel()
                    raise
    finally:
        bar.close()
    return {"done": len(samples) - len(todo), "new": len(todo), "total": len(samples)}


def run_benchmark(benchmark: str, data_dir, predict: Predict, out_dir, **kw) -> Path:
    """Loads the benchmark, runs it into OUT_DIR/<benchmark>.jsonl and returns that path."""
    samples = load(benchmark, str(data_dir))
    out_path = Path(out_dir) / f"{benchmark}.jsonl"
    run_samples(samples, predict, out_path, **kw)
    return out_path
