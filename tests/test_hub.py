"""Hub ids (issue 26 part 3): resolved from a Hub cache laid out as huggingface_hub writes it, offline.

No network: every test sets HF_HUB_OFFLINE=1 and its own cache folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qwenvl import LLM, SamplingParams
from qwenvl.engine.llm_engine import BUNDLED_MODEL_DIR
from qwenvl.checkpoints.hub import ModelNotFoundError, is_hub_id, resolve_model

ROOT = Path(__file__).resolve().parent.parent
COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def add_snapshot(cache: Path, repo_id: str, commit: str, files: list[Path], ref: str | None = "main") -> Path:
    """models--Org--Name/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/<ref>}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in files:
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)          # no stray ./Org/Name folder from the repo root
    add_snapshot(cache, "Org/Tiny", COMMIT_A, sorted(BUNDLED_MODEL_DIR.iterdir()))
    return cache


def test_hub_id_from_the_cache_loads_and_answers_like_the_folder(hub_cache):
    messages = [{"role": "user", "content": [{"text": "How many circles?"}]}]
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    from_hub = LLM("Org/Tiny", device="cpu", dtype="float32")
    assert from_hub.engine.model_dir == hub_cache / "models--Org--Tiny" / "snapshots" / COMMIT_A
    assert from_hub.engine.model_name == "Org/Tiny"
    from_folder = LLM(BUNDLED_MODEL_DIR, device="cpu", dtype="float32")
    assert from_hub.chat(messages, greedy).token_ids == from_folder.chat(messages, greedy).token_ids


def test_revision_picks_a_branch_or_a_commit(hub_cache):
    add_snapshot(hub_cache, "Org/Tiny", COMMIT_B, sorted(BUNDLED_MODEL_DIR.iterdir()), ref="v2")
    assert resolve_model("Org/Tiny").name == COMMIT_A
    assert resolve_model("Org/Tiny", revision="v2").name == COMMIT_B
    assert resolve_model("Org/Tiny", revision=COMMIT_B).name == COMMIT_B
    with pytest.raises(ModelNotFoundError, match="revision 'v3'"):
        resolve_model("Org/Tiny", revision="v3")


def test_hf_home_is_used_when_hf_hub_cache_is_unset(hub_cache, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(hub_cache.parent))     # HF_HOME/hub is the cache
    assert resolve_model("Org/Tiny").name == COMMIT_A
    monkeypatch.setenv("HF_HOME", str(hub_cache.parent / "elsewhere"))
    with pytest.raises(ModelNotFoundError):
        resolve_model("Org/Tiny")


def test_offline_and_not_cached_says_what_to_download_and_how(hub_cache):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("Org/Missing", revision="v1")
    text = str(err.value)
    assert "HF_HUB_OFFLINE=1" in text and str(hub_cache) in text
    assert "hf download Org/Missing --revision v1" in text and "'*.safetensors'" in text


def test_a_snapshot_without_weights_is_not_a_model(hub_cache):
    add_snapshot(hub_cache, "Org/ConfigOnly", COMMIT_A, [BUNDLED_MODEL_DIR / "config.json"])
    with pytest.raises(ModelNotFoundError, match="Org/ConfigOnly"):
        resolve_model("Org/ConfigOnly")


def test_a_local_folder_of_the_same_name_wins(hub_cache, tmp_path):
    local = tmp_path / "Org" / "Tiny"
    shutil.copytree(BUNDLED_MODEL_DIR, local)
    assert resolve_model("Org/Tiny").resolve() == local.resolve()
    assert LLM("Org/Tiny", device="cpu", dtype="float32").engine.model_name == "Tiny"


def test_what_counts_as_a_hub_id():
    assert is_hub_id("Qwen/Qwen2.5-VL-3B-Instruct") and is_hub_id("org_x/name.v2")
    for path in ("./model", "/abs/model", "a/b/c", "model", "../x", "Org/..", "Org/"):
        assert not is_hub_id(path), path
    with pytest.raises(ModelNotFoundError, match="not a Hugging Face Hub id"):
        resolve_model("no/such/folder")


def test_cli_chat_takes_a_hub_id_and_a_revision(hub_cache):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = [sys.executable, "-m", "qwenvl", "chat", "--device", "cpu", "--max-tokens", "4"]
    out = subprocess.run([*run, "--model", "Org/Tiny", "--revision", "main", "Hello"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() != ""
    out = subprocess.run([*run, "--model", "Org/Missing", "Hello"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 2 and "hf download Org/Missing" in out.stderr and "Traceback" not in out.stderr


def test_serve_takes_a_hub_id_and_a_revision(hub_cache):
    import argparse
    import asyncio

    from qwenvl.server.cli import add_serve_subcommand, settings_from_args
    from qwenvl.server.engine_factory import build_engine

    add_snapshot(hub_cache, "Org/Tiny", COMMIT_B, sorted(BUNDLED_MODEL_DIR.iterdir()), ref="v2")
    parser = argparse.ArgumentParser()
    add_serve_subcommand(parser.add_subparsers(dest="command"))
    settings = settings_from_args(parser.parse_args(["serve", "--model", "Org/Tiny", "--revision", "v2",
                                                     "--device", "cpu"]))
    engine = build_engine(settings)
    try:
        assert engine.info().model_name and settings.revision == "v2"
        assert COMMIT_B in str(resolve_model("Org/Tiny", "v2"))
    finally:
        asyncio.run(engine.shutdown(grace_s=1))
