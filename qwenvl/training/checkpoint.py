"""Hugging Face-layout checkpoint folders: a new small Qwen2-VL-architecture model, and saving a trained one.

What we write loads in our `LLM(dir)` and in transformers' Qwen2VLForConditionalGeneration alike: the
original flat Hub `config.json` layout (which every transformers version reads), safetensors with the
transformers 5.x key names our modules carry, the tokenizer files, `preprocessor_config.json` and
`generation_config.json`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..models.qwen2_vl.hf_config import qwen2_vl_config
from ..synthetic import GROUND_REQUESTS

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@dataclass(frozen=True)
class SmallModelDims:
    """Dimensions of a new model; the defaults are the bundled demonstration model's."""
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 1024
    vision_width: int = 192
    vision_depth: int = 8
    vision_heads: int = 3
    min_pixels: int = 56 * 56
    max_pixels: int = 512 * 28 * 28       # canvases up to 600 x 600 keep their full resolution


def preprocessor_config(dims: SmallModelDims) -> dict:
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "min_pixels": dims.min_pixels,
        "max_pixels": dims.max_pixels,
        "size": {"shortest_edge": dims.min_pixels, "longest_edge": dims.max_pixels},
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
    }


def write_new_checkpoint_dir(out_dir: str | Path, tokenizer_dir: str | Path, dims: SmallModelDims) -> Path:
    """Everything but the weights: config, tokenizer, preprocessor and generation configs."""
    from tokenizers import Tokenizer as HFTokenizer

    from .tokenizer_train import special_token_ids
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(tokenizer_dir) / name, out / name)
    tok = HFTokenizer.from_file(str(out / "tokenizer.json"))
    ids = special_token_ids(tok)
    config = qwen2_vl_config(dims, tok.get_vocab_size(), ids)
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(dims), indent=2), encoding="utf-8")
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"], "do_sample": False,
        # the phrasing the synthetic grounding task trains (qwenvl.grounding.declared_grounding_prompt)
        "grounding_prompt": GROUND_REQUESTS["en"], "grounding_prompt_zh": GROUND_REQUESTS["zh"]},
        indent=2, ensure_ascii=False), encoding="utf-8")
    return out


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """The initialisation transformers uses for Qwen2-VL: normal(0, 0.02) weights, zero biases, unit norms."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv3d, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif hasattr(module, "weight") and isinstance(getattr(module, "weight"), nn.Parameter) \
                and module.weight.dim() == 1:
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None and isinstance(module.bias, nn.Parameter):
                nn.init.zeros_(module.bias)


def save_weights(model: nn.Module, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                 max_shard_bytes: int = 0) -> list[Path]:
    """Safetensors with the checkpoint key names (our module names) in `dtype`.

    With `max_shard_bytes`, shards of at most that size plus `model.safetensors.index.json`, the layout
    transformers writes for large models (and a way to keep each file under a transfer limit).
    """
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    out = Path(out_dir)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        path = out / "model.safetensors"
        save_file(state, str(path), metadata={"format": "pt"})
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        path = out / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        paths.append(path)
        weight_map.update({k: path.name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2), encoding="utf-8")
    return paths
