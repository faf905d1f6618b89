"""scripts/gpu_train_read.sh, the lent GPU's one command (issue 41), as a CPU dry run at tiny scale: the same
script, the device's missing packages made missing here too, a few steps instead of minutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The device's python3 has no PyAV, pypdfium2, jsonschema, xgrammar or server packages (the device README's
# list); a training run and `qwenvl eval tasks` must not import them.
DEVICE_LACKS = """
import importlib.abc, sys
MISSING = {"av", "pypdfium2", "jsonschema", "xgrammar", "fastapi", "uvicorn", "gradio", "ray", "httpx", "openai",
           "dashscope", "transformers"}
class _Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in MISSING:
            raise ModuleNotFoundError(f"No module named {name!r} (as on the device)", name=name)
sys.meta_path.insert(0, _Missing())
"""


@pytest.mark.slow
def test_device_script_dry_run_on_cpu_trains_snapshots_and_scores_the_model_it_returns(tmp_path):
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(DEVICE_LACKS)
    out, run = tmp_path / "out", tmp_path / "run"
    env = {**os.environ, "OUT": str(out), "RUN_DIR": str(run), "PYTHON": sys.executable, "PYTHONPATH": str(blocker),
           "DEVICE": "cpu", "MINUTES": "0.35", "WORKERS": "1", "BATCH": "8", "WARMUP": "2", "LR": "2e-3",
           "MEASURE_SECONDS": "0", "EVAL_EVERY": "1000", "SNAPSHOT_EVERY": "5", "EVAL_N": "1", "EVAL_TASKS": "count",
           "GROW": "vision_depth=5 num_hidden_layers=5"}
    done = subprocess.run(["bash", "scripts/gpu_train_read.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=400)
    log = (out / "train.log").read_text() if (out / "train.log").exists() else ""
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + log[-3000:]
    # what comes back from the device: a few plain files, under the tool's eight
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval.txt", "metrics.jsonl", "model.tar", "train.log"]

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "event" not in r]
    assert len(steps) >= 3 and [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    assert any(r.get("event") == "snapshot" for r in lines)              # written while training, not only at the end
    assert lines[-1]["event"] == "finished" and lines[-1]["steps"] == len(steps)
    first, last = steps[0]["loss"], sum(r["loss"] for r in steps[-2:]) / 2
    assert last < 0.9 * first, [r["loss"] for r in steps]                # the loss falls
    assert set(steps[-1]["eval_by_task"]) == {"read", "count", "ground", "color"}   # each task's held-out loss

    scores = json.loads((out / "eval.json").read_text())
    assert set(scores["scores"]) == {"count/en", "count/zh"} and scores["n_per_task_lang"] == 1
    assert "| count |" in (out / "eval.txt").read_text()

    from qwenvl import LLM, SamplingParams
    from qwenvl.models.registry import config_from_dir
    from qwenvl.synthetic import make_sample, messages
    from qwenvl.training.snapshots import read_model_tar
    model = read_model_tar(out, tmp_path / "back")
    config = config_from_dir(model)
    assert config.vision.depth == 5 and config.text.num_hidden_layers == 5
    llm = LLM(str(model), device="cpu")
    sample = make_sample(0, 0, task="count", split="heldout")
    out = llm.generate([messages(sample)[:1]], SamplingParams(temperature=0.0, max_tokens=8))[0]
    # it answers (a few steps at a warm-up's learning rate need not leave the answer right)
    assert out.text.strip() and len(out.token_ids) >= 1, out
