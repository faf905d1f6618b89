"""ModelConfig.from_dir on the tiny checkpoints of every family, in both config.json layouts."""

from __future__ import annotations

import json

import pytest

from qwenvl.models.config import ConfigError, ModelConfig
from qwenvl.models.registry import config_from_dir, config_from_hf

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.mark.parametrize("family", FAMILIES)
def test_both_layouts_give_the_same_config(tiny_checkpoint, family):
    current = config_from_dir(tiny_checkpoint(family))
    flat = config_from_dir(tiny_checkpoint(family, layout="flat"))
    assert current == flat
    assert current.model_type == family


@pytest.mark.parametrize("family", FAMILIES)
def test_token_ids_come_from_the_tokenizer(tiny_checkpoint, family):
    path = tiny_checkpoint(family)
    cfg = config_from_dir(path)
    vocab = json.loads((path / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    assert cfg.image_token_id == ids["<|image_pad|>"]
    assert cfg.video_token_id == ids["<|video_pad|>"]
    assert cfg.vision_start_token_id == ids["<|vision_start|>"]
    assert cfg.vision_end_token_id == ids["<|vision_end|>"]
    assert cfg.eos_token_ids == (ids["<|im_end|>"],)
    assert cfg.text.vocab_size == max(ids.values()) + 1


def test_qwen2_vl_widths(tiny_checkpoint):
    cfg = config_from_dir(tiny_checkpoint("qwen2_vl", layout="flat"))
    # vision_config.hidden_size is the LLM width in Qwen2-VL; embed_dim is the ViT width.
    assert (cfg.vision.width, cfg.vision.out_hidden_size, cfg.vision.intermediate_size) == (32, 64, 128)
    assert cfg.text.mrope_section == (2, 3, 3) and not cfg.text.mrope_interleaved
    assert cfg.text.rope_theta == 1e6 and cfg.text.head_dim == 16 and cfg.text.attention_bias


def test_qwen2_5_vl_window_fields(tiny_checkpoint):
    cfg = config_from_dir(tiny_checkpoint("qwen2_5_vl", layout="flat"))
    v = cfg.vision
    assert (v.width, v.out_hidden_size, v.window_size, v.fullatt_block_indexes) == (32, 64, 112, (1, 3))
    assert v.hidden_act == "silu"


def test_qwen3_vl_fields(tiny_checkpoint):
    cfg = config_from_dir(tiny_checkpoint("qwen3_vl", layout="flat"))
    assert cfg.text.mrope_interleaved and cfg.text.qk_norm and not cfg.text.attention_bias
    assert cfg.vision.patch_size == 16 and cfg.vision.deepstack_visual_indexes == (0, 1)
    assert cfg.vision.num_position_embeddings == 64


@pytest.mark.parametrize("where", ["root", "text_config"])
def test_tie_word_embeddings_anywhere(tiny_checkpoint, where):
    raw = json.loads((tiny_checkpoint("qwen2_vl") / "config.json").read_text())
    raw.pop("tie_word_embeddings", None)
    (raw if where == "root" else raw["text_config"])["tie_word_embeddings"] = True
    assert config_from_hf(raw).text.tie_word_embeddings


def test_errors_name_the_problem(tmp_path, tiny_checkpoint):
    with pytest.raises(ConfigError, match="config.json"):
        config_from_dir(tmp_path)
    raw = json.loads((tiny_checkpoint("qwen2_vl") / "config.json").read_text())
    with pytest.raises(ConfigError, match="llava"):
        config_from_hf({**raw, "model_type": "llava"})
    raw["text_config"].pop("rope_parameters")
    with pytest.raises(ConfigError, match="mrope_section"):
        config_from_hf(raw)


def test_each_family_reads_its_own_rules():
    """Family knowledge lives in models/<family>/family.py; the registry is the one list of families."""
    from qwenvl.models.registry import FAMILIES

    assert set(FAMILIES) == {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"}
    assert FAMILIES["qwen3_vl"].text_defaults.qk_norm and not FAMILIES["qwen2_vl"].text_defaults.qk_norm
    assert FAMILIES["qwen2_5_vl"].video_time_in_positions and FAMILIES["qwen3_vl_moe"].video_timestamps
    with pytest.raises(ConfigError, match="model_type 'llava' is not supported; supported: qwen2_vl"):
        config_from_hf({"model_type": "llava"})
