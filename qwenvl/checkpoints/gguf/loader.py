"""A GGUF language model + its mmproj -> our model, strictly (every parameter filled from the files, every
tensor in the files used, shapes checked), following each tensor's type (weights.py).

The model is built on the meta device from the config the metadata describes (metadata.py); float tensors
are assigned, quantised linears replace their nn.Linear with the int4 / int8 layer made from the blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from ...layers.quantized_embedding import Int8Embedding, TiedInt4Embedding
from ...layers.quantized_linear import Int4Linear
from ...layers.quantized_moe import QuantizedExperts
from ...layers.side_by_side import fuse_side_by_side
from ...models import build_model
from ...models.config import ModelConfig
from ...models.registry import config_from_hf
from ..loader import release_freed_memory
from ..quantize import gather_expert_weights, quantize_model, use_cpu_int8_layout
from .files import GGUFError, GGUFPair
from .metadata import hf_config, tensor_shapes
from .tensor_names import LM, VIS, expert_part, lm_name, vision_name
from .tokenizer import GGUFVocabulary, gguf_vocabulary, token_ids
from .weights import FLOAT_TYPES, float_tensor, linear_from, linears_from, requantised_mode, type_name

EMBEDDING = LM + "embed_tokens"


def gguf_config(pair: GGUFPair, vocabulary: GGUFVocabulary) -> ModelConfig:
    raw = hf_config(pair, token_ids(pair.lm))
    raw["text_config"]["eos_token_id"] = list(vocabulary.eos_token_ids)
    return config_from_hf(raw, source=str(pair.model_path))


def load_gguf_model(pair: GGUFPair, dtype: torch.dtype, device: torch.device, quantization: str | None = None,
                    group_size: int = 128, quantize_vision: bool = False, fuse: bool = False
                    ) -> tuple[nn.Module, ModelConfig, GGUFVocabulary]:
    """(model, cfg, vocabulary) of the pair; the vocabulary makes the tokenizer (Tokenizer.from_gguf).
    `quantization` ("int8" / "int4") applies to a float file only: a quantised file keeps its types."""
    vocabulary = gguf_vocabulary(pair.lm, pair.model_path)
    cfg = gguf_config(pair, vocabulary)
    with torch.device("meta"):
        model = build_model(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    quantised = [t.name for t in pair.lm.tensors if type_name(t) not in FLOAT_TYPES]
    if quantised and quantization:
        raise GGUFError(f"{pair.model_path}: quantization={quantization!r} asks to quantise a file that is "
                        f"quantised already ({type_name(next(t for t in pair.lm.tensors if t.name == quantised[0]))}"
                        f" and others); leave quantization unset: each tensor keeps the type it has in the file")
    state: dict[str, torch.Tensor] = {}
    _read_language_model(pair, model, expected, dtype, state)
    _read_projector(pair, cfg, expected, dtype, state)
    missing, unexpected = model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False,
                                                assign=True)
    del state
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if unexpected or left:
        raise GGUFError(f"{pair.model_path} + {pair.mmproj_path.name}: tensors missing from the files: "
                        f"{(left or unexpected)[:5]}")
    model.to(device)
    if quantization:
        quantize_model(model, quantization, group_size, include_vision=quantize_vision)
    if fuse:
        fuse_side_by_side(model, after_each=release_freed_memory)
    use_cpu_int8_layout(model, after_each=release_freed_memory)
    gather_expert_weights(model, after_each=release_freed_memory)   # a MoE layer's int4 experts on 2 MiB pages
    return model.eval(), cfg, vocabulary


def _checked_shape(t, key: str, expected: dict, path) -> tuple[int, ...]:
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if key not in expected:
        raise GGUFError(f"{path}: unexpected tensor {t.name!r} (our model has no {key})")
    if shape != expected[key]:
        raise GGUFError(f"{path}: tensor {t.name!r} has shape {shape}, the model the metadata describes "
                        f"expects {expected[key]} for {key}")
    return shape


def _plan_language_model(pair: GGUFPair, expected: dict) -> tuple[list, dict]:
    """Every language-model tensor's key and shape checked from the header alone, and every parameter of ours
    covered: (plain tensors [(key, tensor, shape)], expert stacks {layer: {"gate" | "up" | "down": tensor}})."""
    path = pair.model_path
    plain, experts = [], {}
    for t in pair.lm.tensors:
        part = expert_part(t.name)
        if part is not None:
            experts.setdefault(part[0], {})[part[1]] = t
            continue
        key = lm_name(t.name)
        if key is None:
            raise GGUFError(f"{path}: unexpected tensor {t.name!r} (not a Qwen-VL language model tensor)")
        plain.append((key, t, _checked_shape(t, key, expected, path)))
    covered = {key for key, _, _ in plain}
    covered |= {f"{LM}layers.{i}.mlp.experts.{n}" for i in experts for n in ("gate_up_proj", "down_proj")}
    missing = [k for k in expected if k.startswith((LM, "lm_head.")) and k not in covered]
    if missing:
        raise GGUFError(f"{path}: missing tensor(s) for {', '.join(missing[:5])}"
                        + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return plain, experts


def _read_language_model(pair: GGUFPair, model: nn.Module, expected: dict, dtype: torch.dtype,
                         state: dict) -> None:
    plain, experts = _plan_language_model(pair, expected)
    other = requantised_mode(pair.lm.tensors)
    quantised = []
    for key, t, shape in plain:
        if type_name(t) in FLOAT_TYPES or len(shape) == 1:
            state[key] = float_tensor(t, shape, dtype)
        else:
            quantised.append((key, t, shape))
    for key, t, shape in quantised:       # after the floats: a linear's bias is in `state` by now
        module = key.removesuffix(".weight")
        bias = state.pop(module + ".bias", None)
        layer = linear_from(t, shape, dtype, bias, other)
        if module == EMBEDDING:
            _install_embedding(model, layer)
        else:
            _replace(model, module, layer)
        release_freed_memory()
    for layer, parts in experts.items():
        _read_experts(pair.model_path, model, expected, dtype, state, layer, parts, other)


def _read_experts(path, model: nn.Module, expected: dict, dtype: torch.dtype, state: dict, layer: int,
                  parts: dict, other: str) -> None:
    """One layer's expert stacks: gate, up [E, I, H] and down [E, H, I] in the file; ours are gate_up
    [E, 2I, H] (gate rows first) and down, as fused floats or one quantised layer per expert."""
    prefix = f"{LM}layers.{layer}.mlp.experts"
    if f"{prefix}.gate_up_proj" not in expected or set(parts) != {"gate", "up", "down"}:
        raise GGUFError(f"{path}: layer {layer}: expert tensors {sorted(parts)} do not fit the model (it expects "
                        f"gate, up and down stacks {'here' if f'{prefix}.gate_up_proj' in expected else 'nowhere'})")
    e, two_i, h = expected[f"{prefix}.gate_up_proj"]
    shapes = {k: tuple(int(d) for d in reversed(t.shape.tolist())) for k, t in parts.items()}
    want = {"gate": (e, two_i // 2, h), "up": (e, two_i // 2, h), "down": (e, h, two_i // 2)}
    if shapes != want:
        raise GGUFError(f"{path}: layer {layer}: expert stacks of shapes {shapes}, the model expects {want}")
    if all(type_name(t) in FLOAT_TYPES for t in parts.values()):
        state[f"{prefix}.gate_up_proj"] = torch.cat([float_tensor(parts[k], want[k]) for k in ("gate", "up")],
                                                    dim=1).to(dtype)
        state[f"{prefix}.down_proj"] = float_tensor(parts["down"], want["down"], dtype)
        return
    gate_up = linears_from([parts["gate"], parts["up"]], want["gate"], dtype, other=other)
    down = linears_from([parts["down"]], want["down"], dtype, other=other)
    _replace(model, prefix, QuantizedExperts(gate_up, down, two_i // 2))
    release_freed_memory()


def _install_embedding(model: nn.Module, layer: nn.Module) -> None:
    """A quantised token table: int4 rows are read by TiedInt4Embedding, int8 rows by Int8Embedding (sharing
    the head's buffers); a tied model's head is the same layer."""
    if isinstance(layer, Int4Linear):
        table = TiedInt4Embedding(layer)
        if not model.cfg.text.tie_word_embeddings:
            table.add_module("rows", layer)      # its own table: registered, so it moves and counts with the model
    else:
        table = Int8Embedding(layer.qweight, layer.scales)
    if model.cfg.text.tie_word_embeddings:
        model.use_output_head(layer)
    _replace(model, EMBEDDING, table)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _read_projector(pair: GGUFPair, cfg: ModelConfig, expected: dict, dtype: torch.dtype, state: dict) -> None:
    """Projector tensors as floats (the tower stays float, as qwenvl's own quantisation leaves it); the
    converter's split tensors are joined back: q/k/v rows, the patch embedding's two temporal halves."""
    path = pair.mmproj_path
    whole, split = [], {}                  # checked from the header first: nothing is read before all fit
    for t in pair.mmproj.tensors:
        named = vision_name(t.name, cfg.model_type, cfg.vision.deepstack_visual_indexes)
        if named is None:
            raise GGUFError(f"{path}: unexpected tensor {t.name!r} (not part of a {cfg.model_type} vision tower)")
        key, part = named
        if key not in expected:
            raise GGUFError(f"{path}: unexpected tensor {t.name!r} (our model has no {key})")
        if part is None:
            whole.append((key, t, _checked_shape(t, key, expected, path)))
        else:
            split.setdefault(key, {})[part] = t
    covered = {key for key, _, _ in whole} | set(split)
    missing = [k for k in expected if k.startswith(VIS) and k not in covered]
    if missing:
        raise GGUFError(f"{path}: missing tensor(s) for {', '.join(missing[:5])}"
                        + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    for key, t, shape in whole:
        state[key] = float_tensor(t, shape, dtype)
    for key, pieces in split.items():
        values = [float_tensor(pieces[i], tuple(int(d) for d in reversed(pieces[i].shape.tolist())), dtype)
                  for i in sorted(pieces)]
        if key.endswith("patch_embed.proj.weight"):
            joined = torch.stack(values, dim=2)             # [out, C, T, ps, ps]: the two temporal halves
        else:
            joined = torch.cat(values)                      # q, k, v rows
        if tuple(joined.shape) != expected[key]:
            raise GGUFError(f"{path}: the parts of {key} join to shape {tuple(joined.shape)}, the model "
                            f"expects {expected[key]} (a part missing?)")
        state[key] = joined
