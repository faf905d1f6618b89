"""Weight-only quantisation as a module swap (gpt-fast's shape): the model files stay unaware.

Every nn.Linear of the language model, and the output head, becomes the quantised layer of the same
interface (qwenvl/layers/quantized_linear.py). The vision tower stays in its float dtype unless asked: it
runs once per image over hundreds of rows, compute bound, where a quantised weight saves memory but no time.
A tied output head is quantised from the embedding. The embedding table itself is kept in int8 rows
(layers/quantized_embedding.py): a step reads only its new tokens' rows, so the table is memory, not
speed, and each looked-up row is dequantised within half a step of the float row. A tied int8 head is
those same rows; under int4 the tied head is int4 and the embedding reads its rows (no table of its own).
The head takes the requested mode too: an int8 head under int4 (as llama.cpp's Q4_K_M keeps its output
matrix at 6 bits) was measured and left out: no change in the bundled model's task scores, 15% slower
decode at 2B widths, since PyTorch's int8 kernel is no faster than bf16 on a 151936-row matrix here.

Two ways in:
  * `quantize_model(model, mode)`: swap a loaded float model in place (tests, training exports);
  * `LoadQuantizer`: what the loader uses. It swaps the meta-device model to empty quantised layers
    BEFORE any weight is read, then quantises each float tensor the moment it is read from the
    safetensors file, so the float copy of the whole model never exists and peak memory during load
    stays near the quantised model's size.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..layers.moe import Experts
from ..layers.quantized_moe import QuantizedExperts
from ..layers.int8_vnni import forced_layout, uses_fbgemm_layout
from ..layers.quantized_embedding import Int8Embedding, TiedInt4Embedding, TiedInt8Embedding
from ..layers.quantized_linear import Int4Linear, Int8Linear, int4_group_size, quantize_int8

QUANTIZATION_MODES = ("int8", "int4")
_LANGUAGE_PREFIXES = ("model.language_model.", "lm_head")
_VISION_PREFIX = "model.visual."
_TIED_HEAD = "output_head"
_EMBEDDING = "model.language_model.embed_tokens"


def check_quantization(mode: str | None) -> str | None:
    """None, "none" or "" -> None; a known mode -> itself; anything else -> ValueError naming the choices."""
    if mode in (None, "", "none"):
        return None
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"quantization={mode!r} is not supported; use one of {', '.join(QUANTIZATION_MODES)} "
                         "(or None for the checkpoint's own dtype)")
    return mode


def _int4_group(in_features: int, mode: str, group_size: int) -> int | None:
    """The int4 group size for this width, or None where the layer falls back to int8: int4 needs a
    group size dividing in_features (32, 64, 128 or 256), which tiny test models may not have."""
    return int4_group_size(in_features, group_size) if mode == "int4" else None


def quantized_linear(weight: torch.Tensor, bias: torch.Tensor | None, mode: str, group_size: int = 128
                     ) -> nn.Module:
    """The quantised twin of the linear weight[out, in] (+ bias)."""
    g = _int4_group(weight.shape[1], mode, group_size)
    if g is not None:
        return Int4Linear.from_weight(weight, g, bias)
    return Int8Linear.from_int8(*quantize_int8(weight), bias)


def _empty_quantized_linear(in_f: int, out_f: int, bias: bool, dtype: torch.dtype, mode: str,
                            group_size: int) -> nn.Module:
    """A quantised layer with meta-device buffers of the right shapes, to be filled by the loader."""
    meta = dict(device="meta")
    b = torch.empty(out_f, dtype=dtype, **meta) if bias else None
    g = _int4_group(in_f, mode, group_size)
    if g is None:
        return Int8Linear(torch.empty(out_f, in_f, dtype=torch.int8, **meta),
                          torch.empty(out_f, dtype=dtype, **meta), b)
    return Int4Linear.empty(out_f, in_f, g, dtype, bias)


def _targets(model: nn.Module, include_vision: bool) -> list[str]:
    prefixes = _LANGUAGE_PREFIXES + ((_VISION_PREFIX,) if include_vision else ())
    # The MoE router (`mlp.gate`, [E, H]) stays float: it is small, and rounding it would move expert choices.
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith(prefixes)
            and not name.endswith(".mlp.gate")]


def _expert_targets(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, Experts)
            and name.startswith(_LANGUAGE_PREFIXES)]


def _empty_quantized_experts(experts: Experts, dtype: torch.dtype, mode: str, group_size: int) -> QuantizedExperts:
    E, two_i, H = experts.gate_up_proj.shape                             # [E, 2I, H]
    return QuantizedExperts([_empty_quantized_linear(H, two_i, False, dtype, mode, group_size) for _ in range(E)],
                            [_empty_quantized_linear(two_i // 2, H, False, dtype, mode, group_size)
                             for _ in range(E)], two_i // 2)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, group_size: int = 128, include_vision: bool = False) -> nn.Module:
    """Swap a loaded model's linears in place, one at a time (each float weight is freed as soon as its
    twin exists); returns `model`."""
    mode = check_quantization(mode)
    if mode is None:
        return model
    for name in _targets(model, include_vision):
        linear = model.get_submodule(name)
        _replace(model, name, quantized_linear(linear.weight, linear.bias, mode, group_size))
    for name in _expert_targets(model):
        ex = model.get_submodule(name)
        _replace(model, name, QuantizedExperts([quantized_linear(w, None, mode, group_size) for w in ex.gate_up_proj],
                                               [quantized_linear(w, None, mode, group_size) for w in ex.down_proj],
                                               ex.intermediate))
    tied = model.tied_output_weight()
    if tied is not None and _int4_group(tied.shape[1], mode, group_size) is not None:
        head = quantized_linear(tied, None, mode, group_size)
        model.use_output_head(head)
        _replace(model, _EMBEDDING, TiedInt4Embedding(head))
    else:
        table = Int8Embedding.from_float(model.get_submodule(_EMBEDDING).weight)
        if tied is not None:   # an int8 head is the table's own per-row quantisation: shared, not redone
            model.use_output_head(Int8Linear.from_int8(table.qweight, table.scales, None))
        _replace(model, _EMBEDDING, table)
    use_cpu_int8_layout(model)
    return model


def gather_expert_weights(model: nn.Module, after_each=lambda: None) -> int:
    """Every MoE layer's int4 experts side by side on 2 MiB pages (QuantizedExperts.gather_weights), a layer at a
    time, calling `after_each()` after each (the loader returns the originals' memory there); how many moved."""
    moved = 0
    for module in model.modules():
        if isinstance(module, QuantizedExperts) and module.gather_weights():
            moved += 1
            after_each()
    return moved


def use_cpu_int8_layout(model: nn.Module, after_each=lambda: None) -> None:
    """Move the language model's int8 layers held on the CPU into the layout their decode product is fastest
    in, one layer at a time (so only one layer's weights are ever held twice), calling `after_each()` after
    each (the loader returns the plain matrix's memory there):
      * where qwenvl's kernels run (qwenvl/kernels): every layer into their int8 tiles (bench/int8_layouts.py
        has the decode product against the other layouts);
      * else, where this CPU runs fbgemm's integer GEMM faster (layers/int8_vnni.py), the layers large
        enough to gain (`uses_fbgemm_layout`) into fbgemm's layout.
    A quantised vision tower keeps the plain layout: it only ever runs hundreds of rows at once, where the
    plain layer's bf16 GEMM is faster than fbgemm's two activation passes (a 448x448 image's first token:
    7.7 s in bf16, 11.2 s with the tower in the fbgemm layout), for the same one byte a weight."""
    tiles = forced_layout() in (None, "tiles") and kernels.available()    # QWENVL_INT8_LAYOUT may pick another
    shared_head = _head_sharing_the_table(model)
    for name, module in model.named_modules():
        if not isinstance(module, Int8Linear) or name.startswith(_VISION_PREFIX) or module.qweight is None \
                or module.qweight.device.type != "cpu":
            continue
        if tiles:
            module.use_tile_layout()
            after_each()
        elif uses_fbgemm_layout(module.out_features, module.in_features):
            module.use_fbgemm_layout()
            after_each()
    if shared_head is not None and shared_head.tiles is not None:
        # the head's tiles hold the table's rows: the plain matrix would be a second copy (233 MB at 2B widths)
        _replace(model, _EMBEDDING, TiedInt8Embedding(shared_head))
        after_each()


def _head_sharing_the_table(model: nn.Module) -> Int8Linear | None:
    """The tied int8 output head where it holds the same plain int8 matrix as the int8 token table."""
    if not (hasattr(model, "has_output_head") and model.has_output_head()):
        return None
    table, head = model.get_submodule(_EMBEDDING), model.output_head
    if isinstance(table, Int8Embedding) and isinstance(head, Int8Linear) and head.qweight is not None \
            and table.qweight.device.type == "cpu" and table.qweight.data_ptr() == head.qweight.data_ptr() \
            and table.qweight.shape == head.qweight.shape:
        return head
    return None


class LoadQuantizer:
    """Quantise while loading. `prepare(model)` swaps the meta model; then `convert(key, tensor)` maps
    each float checkpoint tensor (already under our key naming, in the model dtype) to the tensors the
    swapped model holds: a target linear's `.weight` becomes its quantised buffers, the tied embedding
    also feeds the quantised output head, everything else passes through."""

    def __init__(self, mode: str, group_size: int = 128, include_vision: bool = False):
        self.mode = check_quantization(mode)
        self.group_size = group_size
        self.include_vision = include_vision
        self._layers: dict[str, tuple[str, int]] = {}  # "<module>.weight" -> (mode, group size) it was given
        self._tied_key: str | None = None
        self._table_of_its_own = True       # False: a tied int4 head's rows serve the embedding
        self._experts: dict[str, tuple[str, tuple[str, int]]] = {}  # fused key -> (module list, format)

    def prepare(self, model: nn.Module, dtype: torch.dtype) -> None:
        for name in _targets(model, self.include_vision):
            lin = model.get_submodule(name)
            _replace(model, name, _empty_quantized_linear(lin.in_features, lin.out_features, lin.bias is not None,
                                                          dtype, self.mode, self.group_size))
            self._layers[f"{name}.weight"] = self._layer_format(lin.in_features)
        for name in _expert_targets(model):
            # fused [E, out, in] tensors in the file; one quantised linear per expert in the model
            ex = model.get_submodule(name)
            H, inter = ex.gate_up_proj.shape[2], ex.intermediate
            _replace(model, name, _empty_quantized_experts(ex, dtype, self.mode, self.group_size))
            self._experts[f"{name}.gate_up_proj"] = (f"{name}.gate_up", self._layer_format(H))
            self._experts[f"{name}.down_proj"] = (f"{name}.down", self._layer_format(inter))
        tied = model.tied_output_weight()
        emb = model.get_submodule(_EMBEDDING)
        table = Int8Embedding.empty(emb.num_embeddings, emb.embedding_dim, dtype)
        if tied is not None:
            head = _empty_quantized_linear(tied.shape[1], tied.shape[0], False, dtype, self.mode, self.group_size)
            model.use_output_head(head)
            self._tied_key = f"{_EMBEDDING}.weight"
            self._layers[f"{_TIED_HEAD}.weight"] = self._layer_format(tied.shape[1])
            if isinstance(head, Int4Linear):    # the embedding reads the int4 head's rows: no table to fill
                table = TiedInt4Embedding(head)
        self._table_of_its_own = isinstance(table, Int8Embedding)
        _replace(model, _EMBEDDING, table)

    def _layer_format(self, in_features: int) -> tuple[str, int]:
        g = _int4_group(in_features, self.mode, self.group_size)
        return ("int8", 0) if g is None else ("int4", g)

    def convert(self, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if key in self._experts:
            return self._quantized_experts(key, tensor)
        out = {} if key in self._layers or key == f"{_EMBEDDING}.weight" else {key: tensor}
        if key in self._layers:
            out.update(self._quantized_buffers(key, tensor))
        if key == f"{_EMBEDDING}.weight":
            table = Int8Embedding.from_float(tensor) if self._table_of_its_own else None
            if table is not None:
                out.update({f"{_EMBEDDING}.{name}": t for name, t in table.named_buffers()})
            if key == self._tied_key:
                out.update(self._tied_head_buffers(table, tensor))
        return out

    def _tied_head_buffers(self, table: Int8Embedding | None, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """An int8 head is the table's own per-row quantisation: shared, not computed and stored twice."""
        head = f"{_TIED_HEAD}.weight"
        if table is not None and self._layers[head] == ("int8", 0):
            return {f"{_TIED_HEAD}.qweight": table.qweight, f"{_TIED_HEAD}.scales": table.scales}
        return self._quantized_buffers(head, tensor)

    def _quantized_buffers(self, weight_key: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return _buffers(weight_key[: -len("weight")], w, *self._layers[weight_key])

    def quantizes_experts(self, key: str) -> bool:
        """Whether `key` is a fused expert tensor this quantiser turns into per-expert layers (the loader then
        reads it one expert at a time and calls `convert_expert`, so the fused float tensor never exists)."""
        return key in self._experts

    def convert_expert(self, key: str, e: int, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Expert e's [out, in] slice of the fused tensor `key` -> its quantised buffers."""
        modules, (mode, group) = self._experts[key]
        return _buffers(f"{modules}.{e}.", w, mode, group)

    def _quantized_experts(self, key: str, fused: torch.Tensor) -> dict[str, torch.Tensor]:
        """fused[E, out, in] -> each expert's quantised buffers, as `<module list>.<e>.<buffer>`."""
        out: dict[str, torch.Tensor] = {}
        for e in range(fused.shape[0]):
            out.update(self.convert_expert(key, e, fused[e]))
        return out


def _buffers(prefix: str, w: torch.Tensor, mode: str, group: int) -> dict[str, torch.Tensor]:
    filled = quantized_linear(w, None, mode, group)
    return {prefix + name: t for name, t in filled.named_buffers() if name not in ("bias", "in_perm")}
