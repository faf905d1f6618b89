"""Load a published pre-quantised checkpoint (AWQ, GPTQ, FP8) into qwenvl's own CPU quantised layers.

The loader's hook for checkpoints whose config.json declares `quantization_config` (the format is read
from `quant_method`, never guessed from tensor names). Which linears hold packed tensors follows the
writers' rules as transformers applies them on load:
  * awq:  every linear but the output head and `modules_to_not_convert` (Qwen's AWQ files list "visual");
  * gptq: the linears of the decoder blocks (`block_name_to_quantize`, by default the language model's
          layers; optionally only `modules_in_block_to_quantize`), minus `modules_to_not_convert`;
  * fp8:  every linear but `modules_to_not_convert` (the output head when that list is absent).
Patterns match our module names and the original Hub names (`visual.*`, `model.layers.*`) alike.

How each format lands, without a float round trip where an exact repack exists:
  * AWQ int4, GPTQ int4 (act-order too) -> Int4Linear.from_int4: the same integers, scales and integer
    zero points, repacked for qwenvl's int4 kernel (float32 group parameters: no second rounding) or, where
    it does not run, for `_weight_int4pack_mm_for_cpu`; a group size the kernel lacks is split into
    kernel-sized groups with repeated scales (exact) when it can be, else that layer becomes float.
  * GPTQ int8 -> Int8Linear when each output row has one scale and one zero point (group_size -1) so that
    q - zero is an int8 per-channel weight, exactly; with groups (Qwen's use 128 columns) the layer is
    dequantised to the model dtype, noted in the log: Int8Linear has one scale per output row, and
    re-rounding to it would be a second lossy quantisation, done only when asked (quantization="int8").
  * FP8 block -> float in the model dtype (weight * weight_scale_inv of its 128x128 block). The CPU has no
    FP8 matrix product, and requantising to int8 per output row would round a second time: e4m3 keeps 3
    mantissa bits of every value, a per-row int8 step is 1/127 of the row's largest value, so small blocks
    would lose most of their bits. Asking `quantization="int8"` on top is explicit and composes: the
    dequantised weight then goes through LoadQuantizer like any float tensor.
Vision tower linears stay float where the checkpoint keeps them float. Mixture-of-experts checkpoints are
refused (their experts are stored per expert; our model fuses them).
"""
from __future__ import annotations

import logging
import re

import torch
from torch import nn

from .checkpoint_keys import canonical_key, legacy_key
from ..layers.moe import Experts
from ..layers.quantized_linear import INT4_GROUP_SIZES, Int4Linear, Int8Linear
from .load_error import LoadError
from .quant_formats import awq, fp8, gptq
from .quant_formats.spec import QuantSpec

log = logging.getLogger("qwenvl.checkpoints.loader")

_DECODER_BLOCKS = "model.language_model.layers"
_HEAD = "lm_head"
_ANY_FLOAT = None                                 # a part whose dtype may be any float (scales, bias)
_INT32 = (torch.int32,)
_INDEX = (torch.int32, torch.int64)               # g_idx: int32 as AutoGPTQ writes it; int64 is as good


class _PendingLayer(nn.Module):
    """Stands in for a packed linear while the loader reads its parts; replaced by `install`. It holds no
    tensors, so a LoadQuantizer prepared afterwards sees no float linear to take over."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x):
        raise RuntimeError("a pre-quantised layer was used before its tensors were loaded")


def _skipped(name: str, patterns: tuple[str, ...]) -> bool:
    """transformers' should_convert_module, inverted, on our name and the Hub's: a pattern matches from the
    start up to a module boundary (as a regex), or as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{p}){boundary}", n) or n.endswith(p)
               for p in patterns for n in (name, legacy_key(name)))


class PrequantizedWeights:
    """prepare(model, expected) -> the checkpoint's tensor names and shapes; convert(key, raw tensor) -> the
    model's tensors once a layer's parts are all read; install(model) puts the built layers in place."""

    def __init__(self, spec: QuantSpec, dtype: torch.dtype):
        self.spec, self.dtype = spec, dtype
        self._parts: dict[str, dict[str, tuple | None]] = {}   # layer -> part -> allowed dtypes (None: floats)
        self._read: dict[str, dict[str, torch.Tensor]] = {}
        self._built: dict[str, nn.Module] = {}
        self._as_float: set[str] = set()         # layers that stay nn.Linear and load a dequantised weight
        self.notes: list[str] = []

    # ---------------------------------------------------------------------------------------- selection
    def _is_target(self, name: str) -> bool:
        s = self.spec
        if s.skip and _skipped(name, s.skip):
            return False
        if s.method == "gptq":
            block = canonical_key(s.block_name + ".").rstrip(".") if s.block_name else _DECODER_BLOCKS
            m = re.match(rf"{re.escape(block)}\.\d+\.(.+)$", name)
            return m is not None and (s.modules_in_block is None or m.group(1) in s.modules_in_block)
        # awq always leaves the head float; fp8 does when modules_to_not_convert is absent
        return not (name == _HEAD and (s.method == "awq" or s.skip is None))

    def prepare(self, model: nn.Module, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Swap the packed linears for placeholders and map the float model's expected tensors to the
        checkpoint's (meta tensors carrying shape and dtype). Layers that load as float (FP8, grouped 8-bit
        GPTQ) stay nn.Linear, so a LoadQuantizer prepared afterwards may still take them over."""
        if any(isinstance(m, Experts) for m in model.modules()):
            raise LoadError(f"pre-quantised ({self.spec.method}) mixture-of-experts checkpoints are not read yet; "
                            "load the bfloat16 checkpoint, with quantization='int8' or 'int4' if memory is short")
        out = dict(expected)
        targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and self._is_target(n)]
        for name in targets:
            lin = model.get_submodule(name)
            parts = self._layout(lin.in_features, lin.out_features, name)
            if lin.bias is not None and self.spec.method != "fp8":
                parts["bias"] = (torch.Size([lin.out_features]), _ANY_FLOAT)
            del out[f"{name}.weight"]
            if "bias" in parts:
                del out[f"{name}.bias"]
            for part, (shape, dtype) in parts.items():
                out[f"{name}.{part}"] = torch.empty(shape, dtype=dtype[0] if dtype else torch.float16, device="meta")
            self._parts[name] = {part: dtype for part, (shape, dtype) in parts.items()}
            if self._loads_as_float(lin.in_features):
                self._as_float.add(name)
                if self.spec.method == "gptq":
                    self.notes.append(f"{name}: a scale per {self.spec.group_size} columns, Int8Linear holds one "
                                      "per output row")
            else:
                _replace(model, name, _PendingLayer(lin.in_features, lin.out_features))
        return out

    def _loads_as_float(self, in_features: int) -> bool:
        s = self.spec
        return s.method == "fp8" or (s.method == "gptq" and s.bits == 8 and s.group_size is not None
                                     and s.group_size < in_features)

    def _layout(self, in_f: int, out_f: int, name: str) -> dict[str, tuple[torch.Size, tuple | None]]:
        """The format's tensors for one linear [out_f, in_f], as the writers store them."""
        s, S = self.spec, torch.Size
        if s.method == "fp8":
            bo, bi = s.block
            # the scales are float32 in Qwen's and DeepSeek's files; any float dtype reads the same
            return {"weight": (S([out_f, in_f]), (torch.float8_e4m3fn,)),
                    "weight_scale_inv": (S([-(-out_f // bo), -(-in_f // bi)]), _ANY_FLOAT)}
        per = 32 // s.bits
        if s.method == "awq":
            if out_f % per or in_f % s.group_size:
                raise LoadError(f"{name}: [{out_f}, {in_f}] does not fit AWQ packing (out % 8, in % group_size "
                                f"{s.group_size})")
            groups = in_f // s.group_size
            return {"qweight": (S([in_f, out_f // per]), _INT32),
                    "qzeros": (S([groups, out_f // per]), _INT32),
                    "scales": (S([groups, out_f]), _ANY_FLOAT)}
        if in_f % per or out_f % per:
            raise LoadError(f"{name}: [{out_f}, {in_f}] does not fit {s.bits}-bit GPTQ packing (multiples of {per})")
        groups = -(-in_f // (s.group_size or in_f))
        return {"qweight": (S([in_f // per, out_f]), _INT32),
                "qzeros": (S([groups, out_f // per]), _INT32),
                "scales": (S([groups, out_f]), _ANY_FLOAT),
                "g_idx": (S([in_f]), _INDEX)}

    # ------------------------------------------------------------------------------------------ reading
    def claims(self, key: str) -> bool:
        layer, _, part = key.rpartition(".")
        return part in self._parts.get(layer, ())

    def convert(self, key: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """One raw checkpoint tensor of a packed layer -> {} until the layer's last part arrives, then the
        tensors the model holds for it (an fp8 layer's float weight, or a built layer's buffers)."""
        layer, _, part = key.rpartition(".")
        want = self._parts[layer][part]
        if want is not None and t.dtype not in want:
            raise LoadError(f"tensor {key!r} has dtype {t.dtype}; the {self.spec.method} format stores it as "
                            + " or ".join(map(str, want)))
        if want is None and not t.is_floating_point():
            raise LoadError(f"tensor {key!r} has dtype {t.dtype}; the {self.spec.method} format stores it as floats")
        got = self._read.setdefault(layer, {})
        got[part] = t
        if len(got) < len(self._parts[layer]):
            return {}
        del self._read[layer]
        if layer in self._as_float:
            return self._float_tensors(layer, got)
        module = self._build(layer, got)
        self._built[layer] = module
        return {f"{layer}.{n}": b for n, b in module.named_buffers()} | \
               {f"{layer}.{n}": p.detach() for n, p in module.named_parameters()}

    def _float_tensors(self, layer: str, got: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        s = self.spec
        if s.method == "fp8":
            w = fp8.dequantize_fp8(got["weight"], got["weight_scale_inv"], s.block)
        else:
            _check_g_idx(layer, got)
            w = gptq.dequantize_gptq(got["qweight"], got["qzeros"], got["scales"], got["g_idx"], s.bits,
                                     s.checkpoint_format)
        out = {f"{layer}.weight": w.to(self.dtype)}
        if "bias" in got:
            out[f"{layer}.bias"] = got["bias"].to(self.dtype)
        return out

    def _build(self, layer: str, got: dict[str, torch.Tensor]) -> nn.Module:
        s, bias = self.spec, got.get("bias")
        if s.method == "awq":
            args = awq.to_int4_linear_args(got["qweight"], got["qzeros"], got["scales"], s.group_size)
            return self._int4_or_float(layer, args, bias, lambda: awq.dequantize_awq(
                got["qweight"], got["qzeros"], got["scales"], s.group_size))
        in_f = got["g_idx"].numel()
        group = min(s.group_size or in_f, in_f)          # a group wider than the row is the whole row
        _check_g_idx(layer, got)
        counts = torch.bincount(got["g_idx"].long(), minlength=got["scales"].shape[0])

        def dequantized():
            return gptq.dequantize_gptq(got["qweight"], got["qzeros"], got["scales"], got["g_idx"], s.bits,
                                        s.checkpoint_format)
        if s.bits == 8:
            return self._int8_or_float(layer, got, bias, dequantized)
        if in_f % group or not bool((counts == group).all()):
            return self._float(layer, dequantized(), bias, f"its g_idx groups are not {group} columns each")
        args = gptq.to_int4_linear_args(got["qweight"], got["qzeros"], got["scales"], got["g_idx"], group,
                                        s.checkpoint_format)
        return self._int4_or_float(layer, args, bias, dequantized)

    def _int4_or_float(self, layer: str, args: dict, bias, dequantized) -> nn.Module:
        """Int4Linear with the checkpoint's own integers; a group size the CPU kernel lacks is split into the
        largest kernel size dividing it (each scale and zero repeated: the same weights exactly)."""
        group, in_f = args["group_size"], args["qweight"].shape[1]
        fits = [k for k in INT4_GROUP_SIZES if group % k == 0 and in_f % k == 0]
        if not fits:
            return self._float(layer, dequantized(), bias,
                               f"group size {group} has no divisor among the int4 kernel's {INT4_GROUP_SIZES}")
        k = max(fits)
        # the checkpoint's own scales (float16): qwenvl's tile layout keeps them and their mins exactly in
        # float32; PyTorch's int4pack layout stores them in the model's dtype
        scales = args["scales"].repeat_interleave(group // k, dim=1)                     # [out, in/k]
        zeros = args["zeros"].float().repeat_interleave(group // k, dim=1)
        return Int4Linear.from_int4(args["qweight"], scales, zeros, k, _cast(bias, self.dtype), args["in_perm"],
                                    dtype=self.dtype)

    def _int8_or_float(self, layer: str, got: dict, bias, dequantized) -> nn.Module:
        """GPTQ 8-bit: Int8Linear (q - zero, one scale per output row) when the row has one scale and one
        zero point and q - zero fits int8, else float."""
        q, z = gptq.unpack_gptq(got["qweight"], got["qzeros"], 8, self.spec.checkpoint_format)  # [in, out], [G, out]
        scales = got["scales"]
        one_per_row = bool((scales == scales[:1]).all()) and bool((z == z[:1]).all())
        if not one_per_row:
            return self._float(layer, dequantized(), bias,
                               "8-bit GPTQ with a scale per group (Int8Linear holds one per output row)")
        w = q.to(torch.int16) - z[0].to(torch.int16)                                      # [in, out]
        if w.min() < -128 or w.max() > 127:
            return self._float(layer, dequantized(), bias, "8-bit GPTQ whose q - zero leaves the int8 range")
        return Int8Linear.from_int8(w.t().to(torch.int8), scales[0].to(self.dtype), _cast(bias, self.dtype))

    def _float(self, layer: str, w: torch.Tensor, bias, why: str) -> nn.Module:
        self.notes.append(f"{layer}: kept as {self.dtype} ({why})")
        lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, dtype=self.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if bias is not None:
                lin.bias.copy_(bias)
        return lin.requires_grad_(False)

    # --------------------------------------------------------------------------------------- installing
    def install(self, model: nn.Module) -> None:
        """Put every built layer in place of its placeholder; log the layers that had to stay float."""
        for name, module in self._built.items():
            _replace(model, name, module)
        if self.notes:
            log.warning("%d pre-quantised (%s) layer(s) loaded as float: %s", len(self.notes), self.spec.method,
                        "; ".join(self.notes[:3]) + (" ..." if len(self.notes) > 3 else ""))


def _check_g_idx(layer: str, got: dict[str, torch.Tensor]) -> None:
    g_idx, n_groups = got["g_idx"], got["scales"].shape[0]
    if g_idx.min() < 0 or g_idx.max() >= n_groups:
        raise LoadError(f"tensor '{layer}.g_idx' names groups outside 0..{n_groups - 1}")


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
