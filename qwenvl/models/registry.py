"""The model families qwenvl runs: one line each (the family's own folder says the rest)."""

from __future__ import annotations

from ..config import ConfigError
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
