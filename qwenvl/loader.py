"""Load a Hugging Face checkpoint folder into our modules: strict, sharded-aware, two key namings.

The model is built on the meta device (no memory, no init), then every parameter is assigned straight
from the safetensors files. Loading is strict: each parameter must be filled from the files, each tensor
in the files must be used (or be on the short ignore list), and shapes must agree; anything else raises
`LoadError` naming the file and the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ModelConfig
from .models import build_model
from .quantize import LoadQuantizer
from .safetensors_reader import SafetensorsReader

# Older checkpoints (transformers < 4.52, and the original Hub uploads) name the towers differently.
_LEGACY_PREFIXES = (("visual.", "model.visual."), ("model.", "model.language_model."))
_CURRENT_PREFIXES = ("model.visual.", "model.language_model.", "lm_head.")


_EXPERT_SUFFIXES = (".experts.gate_up_proj", ".experts.down_proj")


class LoadError(ValueError):
    """A checkpoint folder whose weights do not fit the model; the message names the file and key."""


def canonical_key(key: str) -> str:
    """Map either key naming onto ours (transformers 5.x: model.visual.*, model.language_model.*, lm_head.*)."""
    if key.startswith(_CURRENT_PREFIXES):
        return key
    for old, new in _LEGACY_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards an index names, or the single model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise LoadError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
    else:
        files = [model_dir / "model.safetensors"]
        if not files[0].is_file():
            found = sorted(p.name for p in model_dir.glob("*.safetensors"))
            raise LoadError(f"{files[0]}: not found (and no model.safetensors.index.json)"
                            + (f"; the folder has {found}" if found else ""))
    for f in files:
        if not f.is_file():
            raise LoadError(f"{f}: weight file named by {index.name} not found")
    return files


def read_state_dict(model_dir: Path, expected: dict[str, torch.Tensor], ignore: set[str],
                    dtype: torch.dtype, device: torch.device,
                    quantizer: LoadQuantizer | None = None,
                    experts_in_out: bool = False) -> dict[str, torch.Tensor]:
    """Read every tensor, check it against the expected names and shapes, cast floats to `dtype`; with a
    quantizer, each tensor is converted as soon as it is read (the float copy is dropped right away).
    `experts_in_out`: fused expert tensors are stored [E, in, out] (the Hub's MoE files); they are
    transposed to the model's [E, out, in] before the shape check."""
    state: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    for f in weight_files(model_dir):
        with SafetensorsReader(f) as sf:
            for raw_key in sf.keys():
                key = canonical_key(raw_key)
                if key in ignore:
                    continue
                if key not in expected:
                    raise LoadError(f"{f.name}: unexpected tensor {raw_key!r} (no such parameter in "
                                    f"{model_dir.name}'s model); is config.json the right one for these weights?")
                if key in seen:
                    raise LoadError(f"{f.name}: tensor {raw_key!r} appears twice in the checkpoint")
                seen.add(key)
                t = sf.get_tensor(raw_key)
                if experts_in_out and key.endswith(_EXPERT_SUFFIXES):
                    t = t.transpose(1, 2)        # [E, in, out] -> [E, out, in]; made contiguous by the cast
                want = tuple(expected[key].shape)
                if tuple(t.shape) != want:
                    raise LoadError(f"{f.name}: tensor {raw_key!r} has shape {tuple(t.shape)}, "
                                    f"the model expects {want} (from config.json)")
                if t.is_floating_point():
                    t = t.to(dtype).contiguous()
                for k, v in (quantizer.convert(key, t) if quantizer else {key: t}).items():
                    state[k] = v.to(device)
    missing = [k for k in expected if k not in seen]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise LoadError(f"{model_dir}: missing tensor(s) {', '.join(missing[:5])}{more}")
    return state


def refuse_prequantized(model_dir: Path) -> None:
    """A checkpoint that declares `quantization_config` (AWQ, GPTQ, FP8, bitsandbytes, ...) holds packed
    tensors this loader does not read yet: say so by the format's name instead of failing on a key."""
    try:
        raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return                                  # ModelConfig.from_dir reports those, with the file named
    qc = raw.get("quantization_config") or (raw.get("text_config") or {}).get("quantization_config")
    if qc:
        method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else "unknown"
        raise LoadError(f"{model_dir}: a pre-quantised checkpoint (quantization_config.quant_method={method!r}); "
                        "qwenvl does not read pre-quantised weights yet. Load the original bfloat16/float16 "
                        "checkpoint with quantization='int8' or 'int4' (--quantization) instead.")


def load_model(model_dir: str | Path, dtype: torch.dtype | str = torch.float32,
               device: torch.device | str = "cpu", quantizer: LoadQuantizer | None = None
               ) -> tuple[torch.nn.Module, ModelConfig]:
    """Build the checkpoint's model on `device` in `dtype` and fill it from its safetensors; -> (model, cfg).

    With a `quantizer` (qwenvl/quantize.py) the linears it targets are quantised tensor by tensor while
    reading; the strict checks still run against the checkpoint's own float names and shapes."""
    model_dir = Path(model_dir)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    device = torch.device(device)
    cfg = ModelConfig.from_dir(model_dir)
    refuse_prequantized(model_dir)
    with torch.device("meta"):
        model = build_model(cfg)
    expected = model.state_dict()
    if quantizer is not None:
        quantizer.prepare(model, dtype)
    # A tied checkpoint may still carry a copy of the embedding as lm_head; the model does not use it.
    ignore = {"lm_head.weight"} if cfg.text.tie_word_embeddings else set()
    state = read_state_dict(model_dir, expected, ignore, dtype, device, quantizer,
                            experts_in_out=cfg.text.experts_stored_in_out)
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise LoadError(f"{model_dir}: tensors left unloaded: {leftover[:5]}")
    return model.eval(), cfg
