"""Tiny pre-quantised checkpoints in the published formats (AWQ GEMM, GPTQ v1/v2, FP8 block), each with
its dequantised float twin: the oracle the loaded quantised model must equal.

`write_prequantized(src, out, fmt)` quantises the language model's decoder linears of the tiny float
checkpoint `src` with the packers in qwenvl/quant_formats, writes the tensors under the names and dtypes the
official files use (int32 words, float16 scales and biases, float8_e4m3fn weights), and a config.json with
the `quantization_config` the official Qwen-VL uploads carry. The twin folder holds w = dequantise(packed)
as float32 under the plain `.weight` names, with no quantization_config.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qwenvl.checkpoints.checkpoint_keys import canonical_key, legacy_key
from qwenvl.layers.quantized_linear import quantize_int4
from qwenvl.checkpoints.quant_formats.awq import pack_awq
from qwenvl.checkpoints.quant_formats.fp8 import quantize_fp8
from qwenvl.checkpoints.quant_formats.gptq import pack_gptq

_DECODER_LINEAR = re.compile(r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")

# The formats the tests load, with the quantization_config each writes (fields as the writers spell them).
FORMATS = {
    "awq": dict(quant_method="awq", bits=4, group_size=32, version="gemm", zero_point=True,
                modules_to_not_convert=["visual"]),
    "gptq4": dict(quant_method="gptq", bits=4, group_size=32, desc_act=False, sym=True, damp_percent=0.01,
                  true_sequential=True, static_groups=False),
    "gptq4-actorder-asym": dict(quant_method="gptq", bits=4, group_size=32, desc_act=True, sym=False,
                                damp_percent=0.01, true_sequential=True),
    "gptq4-v2": dict(quant_method="gptq", bits=4, group_size=64, desc_act=False, sym=False,
                     checkpoint_format="gptq_v2"),
    "gptq8-channel": dict(quant_method="gptq", bits=8, group_size=-1, desc_act=False, sym=True),
    "gptq8-grouped": dict(quant_method="gptq", bits=8, group_size=32, desc_act=True, sym=True),
    # block sizes that leave partial edge blocks on the tiny widths (Qwen's uploads use [128, 128])
    "fp8": dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=[32, 48],
                modules_to_not_convert=["lm_head", "model.visual"]),
    # as the Qwen3-VL FP8 configs spell it: every float linear by name, in both namings (filled in below)
    "fp8-listed": dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=[32, 32],
                       ignored_layers=None),
}


def gptq_quantize(w: torch.Tensor, bits: int, group: int | None, sym: bool, perm: torch.Tensor | None):
    """GPTQ's rounding grid (not its error-compensating search, which the layout does not depend on):
    w [out, in] -> q [in, out], zeros [G, out], scales fp16 [G, out], g_idx [in]. With act-order, input
    column perm[j] is the j-th visited and lands in group j // group."""
    out_f, in_f = w.shape
    group = group or in_f
    perm = torch.arange(in_f) if perm is None else perm
    g_idx = torch.empty(in_f, dtype=torch.int32)
    g_idx[perm] = (torch.arange(in_f) // group).to(torch.int32)
    maxq = 2 ** bits - 1
    n_groups = in_f // group
    q = torch.empty(in_f, out_f, dtype=torch.int64)
    zeros = torch.empty(n_groups, out_f, dtype=torch.int64)
    scales = torch.empty(n_groups, out_f, dtype=torch.float16)
    for j in range(n_groups):
        cols = perm[j * group:(j + 1) * group]
        wg = w[:, cols].float()                                            # [out, group]
        lo, hi = wg.amin(1).clamp(max=0), wg.amax(1).clamp(min=0)
        if sym:
            hi = torch.maximum(-lo, hi)
            lo = -hi
        s = ((hi - lo) / maxq).clamp(min=1e-8).half()
        z = torch.full_like(hi, (maxq + 1) // 2) if sym else torch.round(-lo / s.float())
        q[cols] = torch.clamp(torch.round(wg / s.float()[:, None]) + z[:, None], 0, maxq).long().t()
        zeros[j], scales[j] = z.long(), s
    return q, zeros, scales, g_idx


def _pack_layer(fmt: str, cfg: dict, w: torch.Tensor, seed: int):
    """-> ({part: stored tensor}, dequantised float32 weight [out, in]). The dequantised weight is computed
    from the quantiser's own integers, not by unpacking, so the loader's unpackers are under test too."""
    if cfg["quant_method"] == "awq":
        g = cfg["group_size"]
        q, s, z = quantize_int4(w, g, scale_dtype=torch.float16)           # [out, in], [out, in/g] x2
        parts = dict(qweight=pack_awq(q.t()), qzeros=pack_awq(z.t().long()), scales=s.t().contiguous())
        ref = (q.float() - z.float().repeat_interleave(g, 1)) * s.float().repeat_interleave(g, 1)
        return parts, ref
    if cfg["quant_method"] == "fp8":
        bo, bi = cfg["weight_block_size"]
        q, scale_inv = quantize_fp8(w, (bo, bi))
        per_element = scale_inv.repeat_interleave(bo, 0)[: w.shape[0]].repeat_interleave(bi, 1)[:, : w.shape[1]]
        return dict(weight=q, weight_scale_inv=scale_inv), q.float() * per_element
    bits, group = cfg["bits"], (None if cfg["group_size"] == -1 else cfg["group_size"])
    ckpt_fmt = cfg.get("checkpoint_format", "gptq")
    perm = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(seed)) if cfg["desc_act"] else None
    q, z, s, g_idx = gptq_quantize(w, bits, group, cfg["sym"], perm)
    qweight, qzeros = pack_gptq(q, z, bits, ckpt_fmt)
    parts = dict(qweight=qweight, qzeros=qzeros, scales=s, g_idx=g_idx)
    g = g_idx.long()
    return parts, ((q.float() - z[g].float()) * s.float()[g]).t()


def write_prequantized(src: Path, out: Path, fmt: str, legacy_names: bool = False, sharded: bool = False
                       ) -> tuple[Path, Path]:
    """-> (pre-quantised folder, dequantised float twin folder), both complete checkpoints. `sharded`: the
    quantised tensors alternate over two files with an index, so one layer's parts sit in different shards."""
    cfg = FORMATS[fmt]
    method = cfg["quant_method"]
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update({canonical_key(k): v for k, v in load_file(f).items()})
    quant, twin = {}, {}
    for i, (key, t) in enumerate(sorted(tensors.items())):
        name = legacy_key(key) if legacy_names else key
        if not _DECODER_LINEAR.search(key):
            quant[name] = twin[name] = t
            continue
        layer = name[: -len(".weight")]
        parts, w = _pack_layer(fmt, cfg, t.float(), seed=i)
        quant.update({f"{layer}.{p}": v for p, v in parts.items()})
        twin[name] = w
        bias_key = f"{layer}.bias"
        if method != "fp8" and (key[: -len("weight")] + "bias") in tensors:
            # AWQ/GPTQ writers store the bias beside the packed weight in float16
            b = tensors[key[: -len("weight")] + "bias"].half()
            quant[bias_key], twin[bias_key] = b, b.float()
    if "ignored_layers" in cfg:
        floats = sorted(k[: -len(".weight")] for k, t in tensors.items()
                        if t.dim() == 2 and not _DECODER_LINEAR.search(k) and "embed_tokens" not in k)
        cfg = {**cfg, "ignored_layers": [n for f in floats for n in (f, legacy_key(f))]}
    tag = f"{fmt}{'-sharded' if sharded else ''}"
    for folder, state, qc in ((out / f"{tag}-quant", quant, cfg), (out / f"{tag}-dequant", twin, None)):
        shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
        _save(folder, {k: v.contiguous() for k, v in state.items()}, sharded and qc is not None)
        config = json.loads((folder / "config.json").read_text())
        if qc is not None:
            config["quantization_config"] = qc
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return out / f"{tag}-quant", out / f"{tag}-dequant"


def _save(folder: Path, state: dict[str, torch.Tensor], sharded: bool) -> None:
    if not sharded:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    weight_map = {k: names[i % 2] for i, k in enumerate(sorted(state))}
    for name in names:
        save_file({k: state[k] for k, f in weight_map.items() if f == name}, folder / name, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
