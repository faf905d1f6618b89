"""Make a trained small checkpoint deeper without changing what it computes.

A new block is a copy of the last one with its output projections (vision: attn.proj and mlp.fc2, weight
and bias; text: self_attn.o_proj and mlp.down_proj) set to zero, appended after the last: each block adds
its result to the residual stream, so a block that adds zero is the identity and the grown model answers
exactly as the original did. Training then opens the new blocks (the zeroed projections get gradients from
the copied inputs' activations) while everything the original learnt is kept, which a new, wider model would
have to learn again from the start.

Why depth and not width: widening is not function-preserving here (LayerNorm and RMSNorm average over the
width, so padding the residual stream with zeros changes every normalised value), and the bundled model's
counting and grounding took 677k images to learn, more than a ten-minute GPU run draws.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

VISION_PREFIX = "model.visual.blocks."
TEXT_PREFIX = "model.language_model.layers."
VISION_OUTPUTS = ("attn.proj.", "mlp.fc2.")
TEXT_OUTPUTS = ("self_attn.o_proj.", "mlp.down_proj.")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, one file or shards with their index."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(str(folder / name)))
    return state


def _append_blocks(state: dict, prefix: str, outputs: tuple[str, ...], have: int, want: int) -> None:
    last = f"{prefix}{have - 1}."
    block = {k[len(last):]: v for k, v in state.items() if k.startswith(last)}
    if not block:
        raise ValueError(f"no tensors named {last}* in the checkpoint: is it a Qwen2-VL checkpoint of depth {have}?")
    for i in range(have, want):
        for name, tensor in block.items():
            state[f"{prefix}{i}.{name}"] = torch.zeros_like(tensor) if name.startswith(outputs) else tensor.clone()


def grow_depth(src: str | Path, dst: str | Path, vision_depth: int | None = None,
               text_layers: int | None = None) -> Path:
    """Copy checkpoint folder `src` to `dst` with the vision tower grown to `vision_depth` blocks and the
    language model to `text_layers` decoder layers (None: unchanged); weights saved as one file in the
    source's dtype. A smaller depth than the source's is an error (this only adds)."""
    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    vision, text = config["vision_config"]["depth"], config["num_hidden_layers"]
    vision_depth, text_layers = vision_depth or vision, text_layers or text
    if vision_depth < vision or text_layers < text:
        raise ValueError(f"grow_depth only adds blocks: the checkpoint has {vision} vision blocks and {text} "
                         f"decoder layers, asked for {vision_depth} and {text_layers}")
    state = _weights(src)
    _append_blocks(state, VISION_PREFIX, VISION_OUTPUTS, vision, vision_depth)
    _append_blocks(state, TEXT_PREFIX, TEXT_OUTPUTS, text, text_layers)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model") and f.name != "config.json":
            shutil.copyfile(f, dst / f.name)
    config["vision_config"]["depth"] = vision_depth
    config["num_hidden_layers"] = text_layers
    if config.get("max_window_layers") == text:       # "every layer" stays every layer
        config["max_window_layers"] = text_layers
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst
