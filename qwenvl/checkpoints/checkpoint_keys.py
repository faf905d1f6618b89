"""The two key namings of Qwen-VL checkpoints, mapped both ways.

Older checkpoints (transformers < 4.52, and the original Hub uploads) name the towers `visual.*` and
`model.*`; transformers 5.x and qwenvl's modules say `model.visual.*` and `model.language_model.*`.
"""
from __future__ import annotations

_LEGACY_PREFIXES = (("visual.", "model.visual."), ("model.", "model.language_model."))
_CURRENT_PREFIXES = ("model.visual.", "model.language_model.", "lm_head.")


def canonical_key(key: str) -> str:
    """Map either key naming onto ours (transformers 5.x: model.visual.*, model.language_model.*, lm_head.*)."""
    if key.startswith(_CURRENT_PREFIXES):
        return key
    for old, new in _LEGACY_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def legacy_key(key: str) -> str:
    """Our key in the original Hub naming (the inverse of canonical_key on the towers' prefixes)."""
    for old, new in _LEGACY_PREFIXES:
        if key.startswith(new):
            return old + key[len(new):]
    return key
