"""Held-out accuracy of a model on the synthetic tasks (words never seen in training), per task and language.

    python scripts/eval_bundled_model.py [--model DIR] [--n 200] [--out scores.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwenvl import LLM, SamplingParams  # noqa: E402
from qwenvl.training.synthetic import LANGS, TASKS, messages  # noqa: E402
from qwenvl.training.task_eval import evaluate, heldout_set  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    ap.add_argument("--n", type=int, default=200, help="items per task and language")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    llm = LLM(args.model)
    greedy = SamplingParams(temperature=0.0, max_tokens=48)

    def predict(samples):
        return [o.text for o in llm.generate([messages(s)[:1] for s in samples], greedy)]

    started = time.time()
    samples = [s for task in TASKS for lang in LANGS for s in heldout_set(task, lang, args.n)]
    scores = evaluate(predict, samples, batch_size=32)
    scores = {k: round(v, 4) for k, v in scores.items()}
    print(json.dumps(scores, indent=1))
    print(f"{len(samples)} items in {time.time() - started:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({"n_per_task_lang": args.n, "scores": scores}, indent=1))


if __name__ == "__main__":
    main()
