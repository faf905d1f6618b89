"""The model families qwenvl runs: one line each (the family's own folder says the rest), and the readers of
`config.json` that pick a family by its `model_type`."""

from __future__ import annotations

from pathlib import Path

from .config import ConfigError, ModelConfig, read_config_json
from .family import Family
from .qwen2_5_vl.family import FAMILY as QWEN2_5_VL
from .qwen2_vl.family import FAMILY as QWEN2_VL
from .qwen3_vl.family import FAMILY as QWEN3_VL
from .qwen3_vl.family import MOE_FAMILY as QWEN3_VL_MOE

FAMILIES: dict[str, Family] = {f.model_type: f for f in (QWEN2_VL, QWEN2_5_VL, QWEN3_VL, QWEN3_VL_MOE)}


def family_of(model_type, source: str = "config.json") -> Family:
    family = FAMILIES.get(model_type)
    if family is None:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    return family


def config_from_hf(raw: dict, source: str = "config.json") -> ModelConfig:
    """A `config.json` dict of any layout -> ModelConfig, read by the family its `model_type` names."""
    return ModelConfig.from_hf(raw, family_of(raw.get("model_type"), source), source)


def config_from_dir(model_dir: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint folder (its config.json)."""
    raw, source = read_config_json(model_dir)
    return config_from_hf(raw, source)
