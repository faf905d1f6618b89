"""Load a Hugging Face checkpoint folder into our modules: strict, sharded-aware, two key namings.

The model is built on the meta device (no memory, no init), then every parameter is assigned straight
from the safetensors files. Loading is strict: each parameter must be filled from the files, each tensor
in the files must be used (or be on the short ignore list), and shapes must agree; anything else raises
`LoadError` naming the file and the key.
"""

from __future__ import annotations

import ctypes
import json
import logging
import sys
from pathlib import Path

import torch

from .checkpoint_keys import canonical_key
from ..models.config import ModelConfig
from ..models.registry import config_from_dir
from .load_error import LoadError
from ..models import build_model
from .prequantized import PrequantizedWeights
from .quant_formats import UnsupportedQuantFormat
from .quant_formats.spec import read_spec
from ..layers.bf16_linear import use_bf16_decode_kernel
from ..layers.side_by_side import fuse_side_by_side
from .quantize import LoadQuantizer, gather_expert_weights, use_cpu_int8_layout
from .safetensors_reader import SafetensorsReader

_EXPERT_SUFFIXES = (".experts.gate_up_proj", ".experts.down_proj")

log = logging.getLogger("qwenvl.load")


def load_line(model_dir: Path, family: str, device, dtype, quantization: str | None, workers: int = 1) -> str:
    """The one line a front end shows while a model loads: what, which family, where, in what form."""
    dtype_name = str(dtype).replace("torch.", "")
    parts = [family, str(device), dtype_name, quantization or "not quantised"]
    if workers > 1:
        parts.append(f"{workers} tensor-parallel workers")
    return f"loading {model_dir} ({', '.join(parts)})"


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


def checkpoint_tensors(model_dir: Path, expected, skip=lambda key: False, progress: bool = False):
    """(file, reader, raw key, our key) for every checkpoint tensor, strictly: a tensor the model does not
    have or one seen twice is a LoadError naming it, and after the last file one the model needs but no file
    held. `skip(key)` leaves a tensor out (a tied lm_head copy, another rank's tower). Freed heap pages go
    back to the OS after each file. `progress`: a bar over the shards on stderr, for checkpoints of several."""
    seen: set[str] = set()
    files = weight_files(model_dir)
    from tqdm import tqdm

    for f in tqdm(files, desc="shards", unit="file", disable=not progress or len(files) < 2):
        with SafetensorsReader(f) as sf:
            for raw_key in sf.keys():
                key = canonical_key(raw_key)
                if skip(key):
                    continue
                if key not in expected:
                    raise LoadError(f"{f.name}: unexpected tensor {raw_key!r} (no such parameter in "
                                    f"{model_dir.name}'s model); is config.json the right one for these weights?")
                if key in seen:
                    raise LoadError(f"{f.name}: tensor {raw_key!r} appears twice in the checkpoint")
                seen.add(key)
                yield f, sf, raw_key, key
        release_freed_memory()
    missing = [k for k in expected if k not in seen]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise LoadError(f"{model_dir}: missing tensor(s) {', '.join(missing[:5])}{more}")


def read_state_dict(model_dir: Path, expected: dict[str, torch.Tensor], ignore: set[str],
                    dtype: torch.dtype, device: torch.device,
                    quantizer: LoadQuantizer | None = None,
                    experts_in_out: bool = False, prequantized: PrequantizedWeights | None = None,
                    progress: bool = False) -> dict[str, torch.Tensor]:
    """Read every tensor, check it against the expected names and shapes, cast floats to `dtype`; with a
    quantizer, each tensor is converted as soon as it is read (the float copy is dropped right away).
    `experts_in_out`: fused expert tensors are stored [E, in, out] (the Hub's MoE files); they are
    transposed to the model's [E, out, in] before the shape check. `prequantized` takes the packed layers'
    tensors as stored (no cast: int32 words, fp16 scales, fp8 weights) and hands back the model's tensors."""
    state: dict[str, torch.Tensor] = {}
    for f, sf, raw_key, key in checkpoint_tensors(model_dir, expected, skip=ignore.__contains__, progress=progress):
        if quantizer is not None and quantizer.quantizes_experts(key) and \
                (prequantized is None or not prequantized.claims(key)):
            state.update(_read_experts_quantized(sf, raw_key, key, tuple(expected[key].shape), dtype,
                                                 device, quantizer, experts_in_out))
            release_freed_memory()
            continue
        t = sf.get_tensor(raw_key)
        if experts_in_out and key.endswith(_EXPERT_SUFFIXES):
            t = t.transpose(1, 2)        # [E, in, out] -> [E, out, in]; made contiguous by the cast
        want = tuple(expected[key].shape)
        if tuple(t.shape) != want:
            raise LoadError(f"{f.name}: tensor {raw_key!r} has shape {tuple(t.shape)}, "
                            f"the model expects {want} (from config.json)")
        if prequantized is not None and prequantized.claims(key):
            try:
                loaded = prequantized.convert(key, t)
            except LoadError as e:
                raise LoadError(f"{f.name}: {e}") from None
        else:
            loaded = {key: t.to(dtype).contiguous() if t.is_floating_point() else t}
        for k1, v1 in loaded.items():
            for k, v in (quantizer.convert(k1, v1) if quantizer else {k1: v1}).items():
                state[k] = v.to(device)
        if quantizer is not None and t.numel() * t.element_size() > _TRIM_AFTER_BYTES:
            del t, loaded
            release_freed_memory()         # the float tensor and its quantising temporaries
    return state


def prequantized_weights(model_dir: Path, dtype: torch.dtype) -> PrequantizedWeights | None:
    """The hook for a checkpoint that declares `quantization_config` (qwenvl/prequantized.py), or None for
    a plain one. A format qwenvl cannot read (bitsandbytes, ...) is a LoadError naming it."""
    try:
        raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None                             # ModelConfig.from_dir reports those, with the file named
    try:
        spec = read_spec(raw)
    except UnsupportedQuantFormat as e:
        raise LoadError(f"{model_dir}: {e}") from None
    return None if spec is None else PrequantizedWeights(spec, dtype)


def release_freed_memory() -> None:
    """Give the C heap's freed pages back to the OS (glibc's malloc_trim). Quantising while loading frees
    many medium-sized float temporaries, which glibc keeps in its heap: measured on a 12-layer 30B-A3B int4
    load, peak RSS was 1.8x the final model without this, and 1.1x with every free returned at once."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim                                   # glibc only (not musl)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()
_TRIM_AFTER_BYTES = 32 * 2**20          # quantising a float tensor larger than this frees enough to trim


def _read_experts_quantized(sf: SafetensorsReader, raw_key: str, key: str, want: tuple, dtype: torch.dtype,
                            device: torch.device, quantizer: LoadQuantizer, experts_in_out: bool
                            ) -> dict[str, torch.Tensor]:
    """A fused expert tensor read and quantised one expert at a time: the whole float tensor (805 MB for a
    30B-A3B layer's gate_up, twice that transposed) never sits in memory beside the growing model."""
    stored = sf.shape(raw_key)
    shape = (stored[0], stored[2], stored[1]) if experts_in_out else tuple(stored)
    if shape != want:
        raise LoadError(f"{sf.path.name}: tensor {raw_key!r} has shape {shape}, the model expects {want} "
                        "(from config.json)")
    out: dict[str, torch.Tensor] = {}
    for e in range(shape[0]):
        w = sf.get_slice(raw_key, 0, e, e + 1)[0]
        w = (w.t() if experts_in_out else w).to(dtype).contiguous()        # [out, in]
        out.update({k: v.to(device) for k, v in quantizer.convert_expert(key, e, w).items()})
    return out


def load_model(model_dir: str | Path, dtype: torch.dtype | str = torch.float32,
               device: torch.device | str = "cpu", quantizer: LoadQuantizer | None = None,
               fuse: bool = False, progress: bool = False) -> tuple[torch.nn.Module, ModelConfig]:
    """Build the checkpoint's model on `device` in `dtype` and fill it from its safetensors; -> (model, cfg).

    With a `quantizer` (qwenvl/quantize.py) the linears it targets are quantised tensor by tensor while
    reading; the strict checks still run against the checkpoint's own float names and shapes.
    A pre-quantised checkpoint (AWQ, GPTQ, FP8: qwenvl/prequantized.py) loads its packed layers into our
    quantised layers; a `quantizer` then applies only to the linears that are float after that.
    `fuse` stacks q/k/v and gate/up into one product each (qwenvl/layers/side_by_side.py): for inference
    only, since adapters and tensor-parallel shards address the separate layers.
    `progress`: log the load line (qwenvl.load) and show a bar over the shards."""
    model_dir = Path(model_dir)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    device = torch.device(device)
    cfg = config_from_dir(model_dir)
    prequantized = prequantized_weights(model_dir, dtype)
    if progress:
        log.info("%s", load_line(model_dir, cfg.model_type, device, dtype, _quantization_label(quantizer, prequantized)))
    with torch.device("meta"):
        model = build_model(cfg)
    expected = model.state_dict()
    if prequantized is not None:
        try:
            expected = prequantized.prepare(model, expected)
        except LoadError as e:
            raise LoadError(f"{model_dir}: {e}") from None
    if quantizer is not None:
        quantizer.prepare(model, dtype)
    # A tied checkpoint may still carry a copy of the embedding as lm_head; the model does not use it.
    ignore = {"lm_head.weight"} if cfg.text.tie_word_embeddings else set()
    state = read_state_dict(model_dir, expected, ignore, dtype, device, quantizer,
                            experts_in_out=cfg.text.experts_stored_in_out, prequantized=prequantized,
                            progress=progress)
    if prequantized is not None:
        prequantized.install(model)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise LoadError(f"{model_dir}: tensors left unloaded: {leftover[:5]}")
    # Both replace tensors by new ones, layer by layer: each time the freed originals' pages go back to the
    # OS, or they stay resident as heap holes the new sizes do not fit (bf16 at 2B widths: +0.9 GB peak RSS).
    if fuse:
        fuse_side_by_side(model, after_each=release_freed_memory)   # first: stacking needs the plain int8
    use_cpu_int8_layout(model, after_each=release_freed_memory)
    gather_expert_weights(model, after_each=release_freed_memory)   # a MoE layer's int4 experts on 2 MiB pages
    use_bf16_decode_kernel(model)         # after fusing: the fused layers are built as nn.Linear
    return model.eval(), cfg


def _quantization_label(quantizer: LoadQuantizer | None, prequantized: PrequantizedWeights | None) -> str | None:
    labels = []
    if prequantized is not None:
        labels.append(f"{prequantized.spec.method.upper()} pre-quantised")
    if quantizer is not None:
        labels.append(f"{quantizer.mode} at load" + (" (vision too)" if quantizer.include_vision else ""))
    return " + ".join(labels) or None
