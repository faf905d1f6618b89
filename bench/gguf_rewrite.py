"""GGUF files rewritten with the `gguf` package: every tensor re-encoded in the type a rule picks, for
quantised test files and the load bench where llama-quantize is not built (building it takes minutes).

`gguf` implements the quantisation of Q8_0, Q4_0, Q4_1, Q5_0, ... but only the dequantisation of Q4_K and
Q6_K, so their blocks come from the small quantisers here. Any valid blocks serve: tests compare qwenvl's
weights with gguf's own dequantisation of the same bytes. Used by tests/gguf_files.py and bench/gguf_load.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def rewrite(src: Path, dst: Path, type_for) -> Path:
    """Copy `src` to `dst` with every tensor's data in the type `type_for(name, shape)` names ("F32", "Q8_0",
    "Q4_K", ...; None keeps the stored type, "DROP" leaves the tensor out); metadata copied unchanged.
    Quantised from float32 values."""
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
        if kind == "DROP":                 # left out: a broken file for the error tests
            continue
        if kind == "F32":
            writer.add_tensor(t.name, values)
            continue
        qtype = GGMLQuantizationType[kind]
        own = {"Q4_K": quantize_q4_k, "Q6_K": quantize_q6_k}.get(kind)
        data = own(values) if own else quantize(values, qtype)
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


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """float32 [rows, cols] (cols a multiple of 256) -> Q6_K blocks uint8 [rows, cols / 256 * 210].

    Per group of 16: w ~ d * sc * (q - 32), q 0..63, sc an int8 multiple of the super-block's fp16 d, signed as
    llama.cpp's are (the group's extreme maps to -32). ggml's layout per 256 weights: ql[128] (low 4 bits),
    qh[64] (high 2 bits), scales[16], d; weight 128 h + 32 k + l has its low bits in ql[64 h + 32 (k % 2) + l]
    (the high nibble for k >= 2) and its high bits at bit 2k of qh[32 h + l]."""
    rows, cols = x.shape
    n = cols // 256
    g = x.reshape(rows, n, 16, 16).astype(np.float32)
    pick = np.abs(g).argmax(axis=3)[..., None]
    scale = np.take_along_axis(g, pick, axis=3)[..., 0] / -32.0                 # [rows, n, 16], signed
    top = np.abs(scale).max(axis=2)                                              # [rows, n]
    d = (top / 127.0).astype(np.float16)
    d = np.where(d.astype(np.float32) * 127 < top, np.nextafter(d, np.float16(np.inf)), d)   # |sc| <= 127
    safe = lambda v: np.where(v == 0, 1.0, v.astype(np.float32))
    sc = np.clip(np.rint(scale / safe(d)[..., None]), -128, 127).astype(np.int8)
    step = d.astype(np.float32)[..., None] * sc
    q = (np.clip(np.rint(g / safe(step)[..., None]), -32, 31) + 32).astype(np.uint8)   # [rows, n, 16, 16]
    q = q.reshape(rows, n, 2, 4, 32)                                               # h, k, l
    ql = (q[:, :, :, 0:2] & 0x0F) | ((q[:, :, :, 2:4] & 0x0F) << 4)                # [rows, n, 2, 2, 32]
    qh = sum(((q[:, :, :, k] >> 4) << (2 * k)) for k in range(4)).astype(np.uint8)  # [rows, n, 2, 32]
    blocks = np.concatenate([ql.reshape(rows, n, 128), qh.reshape(rows, n, 64), sc.view(np.uint8),
                             d.view(np.uint8).reshape(rows, n, 2)], axis=2)
    return blocks.reshape(rows, -1)
