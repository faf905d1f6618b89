"""Image preprocessing for a GGUF pair: patch size, merge size, mean and std from the projector's `clip.*`
keys; the pixel budget from `clip.vision.image_min_pixels` / `image_max_pixels` where the converter wrote
them, else the released preprocessor_config.json values of the family (the converter does not store them
for Qwen-VL). The result is a preprocessor_config.json dict (inputs.PreprocessorConfig.from_dict reads it);
a preprocessor_config.json beside the GGUF files wins, as it does in a Hugging Face folder (the engine's
choice: `preprocessor_beside`).
"""

from __future__ import annotations

from pathlib import Path

from .files import GGUFPair, field

# The Hub's preprocessor_config.json budgets: Qwen2-VL / Qwen2.5-VL min_pixels 3136, max_pixels 12845056;
# Qwen3-VL size {shortest_edge: 65536, longest_edge: 16777216}.
_PIXELS = {"qwen2_vl": (3136, 12845056), "qwen2_5_vl": (3136, 12845056),
           "qwen3_vl": (65536, 16777216), "qwen3_vl_moe": (65536, 16777216)}


def preprocessor_beside(pair: GGUFPair) -> Path | None:
    """The folder to read preprocessor_config.json from instead of the projector's keys, if it has one."""
    return pair.folder if (pair.folder / "preprocessor_config.json").is_file() else None


def preprocessor_config(pair: GGUFPair) -> dict:
    """preprocessor_config.json's fields, from the projector's keys."""
    proj = pair.mmproj
    default_min, default_max = _PIXELS[pair.family]
    raw = {
        "patch_size": field(proj, "clip.vision.patch_size"),
        "merge_size": field(proj, "clip.vision.spatial_merge_size", 2),
        "temporal_patch_size": 2,
        "image_mean": [float(x) for x in field(proj, "clip.vision.image_mean")],
        "image_std": [float(x) for x in field(proj, "clip.vision.image_std")],
        "min_pixels": field(proj, "clip.vision.image_min_pixels", default_min),
        "max_pixels": field(proj, "clip.vision.image_max_pixels", default_max),
    }
    return raw
