"""GGUF test files made by llama.cpp's own converter, and quantised copies of them.

The converter is `convert_hf_to_gguf.py` from the llama-cpp-python source package (it vendors llama.cpp),
downloaded once per machine into ~/.cache/qwenvl/llama-cpp-python (QWENVL_LLAMACPP_CACHE overrides) by
bench/vs_llamacpp.py's `source_tree` and run by its `converter_child`. A machine that cannot reach the
package registry skips these tests; nothing else does.

llama-quantize is not built here (6 minutes), so quantised files are written by rewriting the converter's
F32 file with the `gguf` package: its own quantiser for Q8_0 / Q4_0 / Q5_0, and for Q4_K the small
quantiser below (gguf implements Q4_K's dequantisation, the reference, but not its quantisation). Any valid
Q4_K blocks serve: the tests compare our weights with gguf's dequantisation of the same bytes.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("vs_llamacpp", ROOT / "bench" / "vs_llamacpp.py")
vs_llamacpp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vs_llamacpp)


def cache_dir() -> Path:
    return Path(os.environ.get("QWENVL_LLAMACPP_CACHE", Path.home() / ".cache" / "qwenvl" / "llama-cpp-python"))


def converter_tree() -> Path:
    """vendor/llama.cpp of the cached sdist; downloaded on first use, a skip when the registry is unreachable."""
    try:
        return vs_llamacpp.source_tree(cache_dir(), None)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"llama-cpp-python's source package could not be downloaded (registry unreachable?): {e}")


def convert(checkpoint: Path, out_dir: Path, outtype: str = "f32") -> tuple[Path, Path]:
    """(language model GGUF, mmproj GGUF) of `checkpoint`, by the converter, the two runs side by side."""
    tree = converter_tree()
    lm, mmproj = out_dir / f"{checkpoint.name}-{outtype}.gguf", out_dir / f"mmproj-{checkpoint.name}-{outtype}.gguf"
    runs = []
    for out, extra in ((lm, []), (mmproj, ["--mmproj"])):
        cmd = [sys.executable, str(ROOT / "bench" / "vs_llamacpp.py"), "--converter-child", str(tree), "qwen2", "--",
               str(checkpoint), "--outtype", outtype, "--outfile", str(out), *extra]
        runs.append((out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    for out, proc in runs:
        log, _ = proc.communicate()
        assert proc.returncode == 0 and out.is_file(), f"converter failed for {out.name}:\n{log[-3000:]}"
    return lm, mmproj


# --------------------------------------------------------------------------------- rewriting a GGUF
def rewrite(src: Path, dst: Path, type_for) -> Path:
    """Copy `src` to `dst` with every tensor's data in the type `type_for(name, shape)` names ("F32", "Q8_0",
    "Q4_K", ...; None keeps the stored type); metadata copied unchanged. Quantised from float32 values."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize, quantize
    reader = GGUFReader(src)
    writer = GGUFWriter(dst, arch=reader.fields["general.architecture"].contents())
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        values = dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float32)
        kind = type_for(t.name, shape) or t.tensor_type.name
        if kind == "F32":
            writer.add_tensor(t.name, values)
            continue
        qtype = GGMLQuantizationType[kind]
        data = quantize_q4_k(values) if kind == "Q4_K" else quantize(values, qtype)
        writer.add_tensor(t.name, data, raw_dtype=qtype)      # shape: from the bytes per row and the type
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def dequantised_copy(src: Path, dst: Path) -> Path:
    """`src` with every tensor as float32 holding gguf's dequantisation of it: the reference model."""
    return rewrite(src, dst, lambda name, shape: "F32")


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] (cols a multiple of 256) -> Q4_K blocks uint8 [rows, cols / 256 * 144].

    Per sub-block of 32: w ~ scale * q - min with q 0..15; per super-block the 8 scales and mins are 6-bit
    multiples of fp16 d and dmin (ggml's layout: d, dmin, 12 bytes of packed 6-bit values, 128 of nibbles)."""
    rows, cols = x.shape
    sb = x.reshape(rows, cols // 256, 8, 32).astype(np.float32)
    lo = np.minimum(sb.min(axis=3), 0.0)
    hi = np.maximum(sb.max(axis=3), 0.0)
    scale, mins = (hi - lo) / 15.0, -lo                                     # [rows, n, 8]
    d = (scale.max(axis=2) / 63.0).astype(np.float16)
    dmin = (mins.max(axis=2) / 63.0).astype(np.float16)
    safe = lambda v: np.where(v == 0, 1.0, v.astype(np.float32))
    sc = np.clip(np.rint(scale / safe(d)[..., None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(mins / safe(dmin)[..., None]), 0, 63).astype(np.uint8)
    step = d.astype(np.float32)[..., None] * sc
    off = dmin.astype(np.float32)[..., None] * mn
    q = np.clip(np.rint((sb + off[..., None]) / safe(step)[..., None]), 0, 15).astype(np.uint8)  # [r, n, 8, 32]
    packed = np.zeros((rows, cols // 256, 12), dtype=np.uint8)
    packed[..., 0:4] = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
    packed[..., 4:8] = (mn[..., 0:4] & 63) | ((mn[..., 4:8] >> 4) << 6)
    packed[..., 8:12] = (sc[..., 4:8] & 0x0F) | ((mn[..., 4:8] & 0x0F) << 4)
    nibbles = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).reshape(rows, cols // 256, 128)
    blocks = np.concatenate([d.view(np.uint8).reshape(rows, -1, 2), dmin.view(np.uint8).reshape(rows, -1, 2),
                             packed, nibbles], axis=2)
    return blocks.reshape(rows, -1)
