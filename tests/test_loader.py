"""qwenvl.checkpoints.loader: strict loading of single, sharded, legacy-named and tied checkpoints; errors that name the key."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenvl.checkpoints.loader import LoadError, canonical_key, load_model

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _hf_state(path):
    """The checkpoint's tensors, under our key names."""
    files = sorted(path.glob("*.safetensors"))
    return {canonical_key(k): v for f in files for k, v in load_file(f).items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_every_tensor_exactly(tiny_checkpoint, family):
    path = tiny_checkpoint(family)
    model, cfg = load_model(path)
    assert cfg.model_type == family
    ours = model.state_dict()
    ref = _hf_state(path)
    assert set(ours) == set(ref)
    for k, v in ref.items():
        assert torch.equal(ours[k], v), k
    assert not any(t.is_meta for t in model.parameters())


@pytest.mark.parametrize("family", ("qwen2_vl", "qwen2_5_vl"))
def test_sharded_and_flat_layouts_load_the_same_weights(tiny_checkpoint, family):
    single, _ = load_model(tiny_checkpoint(family))
    sharded_dir = tiny_checkpoint(family, layout="flat", sharded=True)
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    sharded, _ = load_model(sharded_dir)
    a, b = single.state_dict(), sharded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _legacy_key(key: str) -> str:
    return key.replace("model.visual.", "visual.").replace("model.language_model.", "model.")


@pytest.mark.parametrize("naming", ["legacy", "current"])
def test_both_key_namings(tiny_checkpoint, tmp_path, naming):
    # transformers 5.x's save_pretrained still writes the legacy naming; rewrite the file both ways.
    path = _copy(tiny_checkpoint("qwen2_vl"), tmp_path / naming)
    state = {canonical_key(k): v for k, v in load_file(path / "model.safetensors").items()}
    rename = _legacy_key if naming == "legacy" else (lambda k: k)
    save_file({rename(k): v for k, v in state.items()}, path / "model.safetensors")
    model, _ = load_model(path)
    key = "model.visual.blocks.0.attn.qkv.weight"
    assert torch.equal(model.state_dict()[key], state[key])


def _tie(path, keep_lm_head: bool):
    raw = json.loads((path / "config.json").read_text())
    raw["tie_word_embeddings"] = True
    (path / "config.json").write_text(json.dumps(raw))
    if not keep_lm_head:
        _edit_state(path, lambda s: s.pop("lm_head.weight"))


@pytest.mark.parametrize("keep_lm_head", [False, True])
def test_tied_embeddings(tiny_checkpoint, tmp_path, keep_lm_head):
    path = _copy(tiny_checkpoint("qwen2_vl"), tmp_path / "tied")
    _tie(path, keep_lm_head)
    model, cfg = load_model(path)
    assert cfg.text.tie_word_embeddings
    hidden = torch.randn(3, cfg.text.hidden_size)
    emb = model.model.language_model.embed_tokens.weight
    torch.testing.assert_close(model.compute_logits(hidden), hidden @ emb.T)


def test_bfloat16(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint("qwen2_vl"), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_weights_file(tmp_path, tiny_checkpoint):
    path = _copy(tiny_checkpoint("qwen2_vl"), tmp_path / "nofile")
    (path / "model.safetensors").unlink()
    with pytest.raises(LoadError, match="model.safetensors"):
        load_model(path)


def test_missing_shard(tmp_path, tiny_checkpoint):
    path = _copy(tiny_checkpoint("qwen2_vl", sharded=True), tmp_path / "noshard")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(LoadError, match=shard.name):
        load_model(path)


def _edit_state(path, edit):
    """Edit the tensors under our key names, then write them back in the file's own naming."""
    state = {canonical_key(k): v for k, v in load_file(path / "model.safetensors").items()}
    edit(state)
    save_file({_legacy_key(k): v for k, v in state.items()}, path / "model.safetensors")


def test_missing_tensor(tmp_path, tiny_checkpoint):
    path = _copy(tiny_checkpoint("qwen2_vl"), tmp_path / "missing")
    _edit_state(path, lambda s: s.pop("model.language_model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(LoadError, match=r"missing tensor.*layers\.1\.mlp\.up_proj\.weight"):
        load_model(path)


def test_unexpected_tensor(tmp_path, tiny_checkpoint):
    path = _copy(tiny_checkpoint("qwen2_vl"), tmp_path / "extra")
    _edit_state(path, lambda s: s.update({"model.language_model.layers.9.extra": torch.zeros(2)}))
    with pytest.raises(LoadError, match=r"model.safetensors.*unexpected tensor.*layers\.9\.extra"):
        load_model(path)


def test_shape_mismatch(tmp_path, tiny_checkpoint):
    path = _copy(tiny_checkpoint("qwen2_vl"), tmp_path / "shape")
    key = "model.visual.merger.mlp.2.weight"
    _edit_state(path, lambda s: s.update({key: torch.zeros(3, 3)}))
    with pytest.raises(LoadError, match=r"merger\.mlp\.2\.weight.*\(3, 3\).*\(64, 128\)"):
        load_model(path)


def test_canonical_key():
    assert canonical_key("visual.blocks.0.norm1.weight") == "model.visual.blocks.0.norm1.weight"
    assert canonical_key("model.embed_tokens.weight") == "model.language_model.embed_tokens.weight"
    assert canonical_key("model.language_model.norm.weight") == "model.language_model.norm.weight"
    assert canonical_key("lm_head.weight") == "lm_head.weight"


def test_one_load_line_and_a_bar_over_the_shards(tiny_checkpoint, caplog, capsys):
    import logging

    from qwenvl.checkpoints.quantize import LoadQuantizer
    from qwenvl.engine.llm_engine import EngineConfig, LLMEngine

    path, single = tiny_checkpoint("qwen2_vl", sharded=True), tiny_checkpoint("qwen2_vl")
    shards = len(set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert shards > 1
    capsys.readouterr()                                              # building them printed its own bars
    caplog.set_level(logging.INFO, logger="qwenvl.load")
    LLMEngine(path, dtype="float32", device="cpu", config=EngineConfig(num_kv_blocks=8))
    assert [r.getMessage() for r in caplog.records] == [f"loading {path} (qwen2_vl, cpu, float32, not quantised)"]
    err = capsys.readouterr().err
    assert "shards: 100%" in err and f"{shards}/{shards}" in err
    caplog.clear()
    load_model(single, quantizer=LoadQuantizer("int8"), progress=True)
    assert [r.getMessage() for r in caplog.records] == [f"loading {single} (qwen2_vl, cpu, float32, int8 at load)"]
    assert "shards" not in capsys.readouterr().err                  # one file: no bar
    caplog.clear()
    load_model(path)                                                  # a library call: silent
    assert not caplog.records and "shards" not in capsys.readouterr().err
