"""`quantization_config` of a pre-quantised checkpoint, read and checked once: what the loader may rely on.

The fields and their defaults are the ones the writers put in config.json (transformers' AwqConfig /
GPTQConfig / FineGrainedFP8Config, AutoAWQ, AutoGPTQ, GPTQModel). Anything the CPU repack cannot honour
exactly is refused here, by name, before a tensor is read.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import SUPPORTED_METHODS, UnsupportedQuantFormat


@dataclass(frozen=True)
class QuantSpec:
    method: str                                  # "awq" | "gptq" | "fp8"
    bits: int = 4                                # awq: 4; gptq: 4 or 8; fp8: 8
    group_size: int | None = None                # input columns per scale; None: one group per row (GPTQ -1)
    desc_act: bool = False                       # gptq act-order: g_idx is a permutation of the groups
    sym: bool = True
    checkpoint_format: str = "gptq"              # gptq: "gptq" (v1, stores zero - 1) or "gptq_v2"
    block: tuple[int, int] | None = None         # fp8: weight_block_size [out, in]
    skip: tuple[str, ...] | None = None          # modules_to_not_convert as written; None when absent
    block_name: str | None = None                # gptq: block_name_to_quantize (default: the decoder layers)
    modules_in_block: tuple[str, ...] | None = None   # gptq: modules_in_block_to_quantize, flattened


def raw_quantization_config(config: dict) -> dict | None:
    """The checkpoint's quantization_config (root, or text_config for nested layouts), or None."""
    qc = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if qc and not isinstance(qc, dict):
        raise UnsupportedQuantFormat(f"quantization_config must be an object, not {type(qc).__name__}")
    return qc or None


def read_spec(config: dict) -> QuantSpec | None:
    """config.json (parsed) -> QuantSpec, or None for an unquantised checkpoint. UnsupportedQuantFormat
    names the method or field that cannot be loaded."""
    qc = raw_quantization_config(config)
    if qc is None:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method not in SUPPORTED_METHODS:
        raise UnsupportedQuantFormat(
            f"a pre-quantised checkpoint (quantization_config.quant_method={method!r}); qwenvl reads the "
            f"pre-quantised formats {', '.join(SUPPORTED_METHODS)} only. Load the original bfloat16/float16 "
            "checkpoint with quantization='int8' or 'int4' (--quantization) instead.")
    # vLLM / SGLang FP8 configs name the same list ignored_layers
    skip = qc.get("modules_to_not_convert", qc.get("ignored_layers"))
    skip = None if skip is None else tuple(str(s) for s in skip)
    return {"awq": _awq, "gptq": _gptq, "fp8": _fp8}[method](qc, skip)


def _awq(qc: dict, skip) -> QuantSpec:
    # AutoAWQ's own quant_config.json spells them w_bit / q_group_size; transformers' AwqConfig bits / group_size
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    version = str(qc.get("version", qc.get("format", "gemm"))).lower()
    if bits != 4:
        raise UnsupportedQuantFormat(f"awq with bits={bits}: only 4-bit AWQ checkpoints exist and load")
    if version != "gemm":
        raise UnsupportedQuantFormat(f"awq version={version!r}: only the 'gemm' packing is read (the GEMV and "
                                     "exllama/marlin layouts interleave differently); use a GEMM checkpoint")
    if not qc.get("zero_point", True):
        raise UnsupportedQuantFormat("awq with zero_point=false is not read (GEMM checkpoints store zero points)")
    if group <= 0:
        raise UnsupportedQuantFormat(f"awq group_size={group}: AWQ GEMM needs a positive group size")
    return QuantSpec("awq", 4, group, skip=skip, sym=False)


def _gptq(qc: dict, skip) -> QuantSpec:
    bits = int(qc.get("bits", 4))
    if bits not in (4, 8):
        raise UnsupportedQuantFormat(f"gptq with bits={bits}: only 4- and 8-bit GPTQ checkpoints are read")
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise UnsupportedQuantFormat(f"gptq checkpoint_format={fmt!r}: only 'gptq' (v1) and 'gptq_v2' are read "
                                     "(marlin/bitblas repacks are GPU layouts)")
    group = int(qc.get("group_size", 128))
    if group == 0 or group < -1:
        raise UnsupportedQuantFormat(f"gptq group_size={group}: expected -1 (one group per row) or a positive size")
    inner = qc.get("modules_in_block_to_quantize")
    return QuantSpec("gptq", bits, None if group == -1 else group, desc_act=bool(qc.get("desc_act", False)),
                     sym=bool(qc.get("sym", True)), checkpoint_format=fmt, skip=skip,
                     block_name=qc.get("block_name_to_quantize"),
                     modules_in_block=None if inner is None else tuple(str(m) for names in inner for m in names))


def _fp8(qc: dict, skip) -> QuantSpec:
    block = qc.get("weight_block_size")
    if not block or len(block) != 2:
        raise UnsupportedQuantFormat(f"fp8 with weight_block_size={block!r}: only block-quantised FP8 "
                                     "(weight_block_size [128, 128], weight_scale_inv per block) is read")
    scheme = str(qc.get("activation_scheme", "dynamic")).lower()
    if scheme != "dynamic":
        raise UnsupportedQuantFormat(f"fp8 activation_scheme={scheme!r}: only 'dynamic' is read (static input "
                                     "scales would be ignored by weight-only CPU layers)")
    fmt = str(qc.get("fmt", "e4m3")).lower()
    if fmt != "e4m3":
        raise UnsupportedQuantFormat(f"fp8 fmt={fmt!r}: only float8_e4m3fn weights are read")
    return QuantSpec("fp8", 8, block=(int(block[0]), int(block[1])), skip=skip)
