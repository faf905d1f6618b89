"""Shared fixtures: tiny checkpoints built once per test session (building one takes a couple of seconds)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # lets tests import tiny / hf_reference

torch.set_num_threads(1)  # the test machines are small and shared; tiny models gain nothing from threads


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(family, layout="current", sharded=False, seed=0) -> Path, cached for the session."""
    from tiny import make_checkpoint

    root = tmp_path_factory.mktemp("tiny_checkpoints")
    built: dict[tuple, Path] = {}

    def get(family: str, layout: str = "current", sharded: bool = False, seed: int = 0) -> Path:
        key = (family, layout, sharded, seed)
        if key not in built:
            built[key] = make_checkpoint(root, family, layout=layout, sharded=sharded, seed=seed)
        return built[key]

    return get


@pytest.fixture()
def tied_checkpoint(tiny_checkpoint, tmp_path):
    """The tiny Qwen2-VL with tie_word_embeddings on and no lm_head.weight: the token table is the head."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file
    path = tmp_path / "tied"
    shutil.copytree(tiny_checkpoint("qwen2_vl"), path)
    raw = json.loads((path / "config.json").read_text())
    raw["tie_word_embeddings"] = True
    (path / "config.json").write_text(json.dumps(raw))
    state = load_file(path / "model.safetensors")
    state.pop("lm_head.weight", None)
    save_file(state, path / "model.safetensors")
    return path
