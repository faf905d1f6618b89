"""Read safetensors files tensor by tensor with plain reads, never a memory map.

`safetensors.safe_open` maps the whole file: every page a tensor is read from stays mapped, so it counts
in the process's resident memory until the file is closed, and a model converted while loading (quantised,
repacked) peaks at file size + converted size. Reading each tensor into its own buffer keeps the peak at
what the model keeps plus one tensor. The format is an 8-byte little-endian header length, a JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 << 20


class SafetensorsError(ValueError):
    """A file that is not a readable safetensors file; the message names the file and what is wrong."""


class SafetensorsReader:
    """with SafetensorsReader(path) as f: for key in f.keys(): t = f.get_tensor(key)"""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        try:
            self._entries, self._data_start = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _read_header(self) -> tuple[dict, int]:
        raw = self._file.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{self.path.name}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise SafetensorsError(f"{self.path.name}: header of {n} bytes; not a safetensors file?")
        try:
            header = json.loads(self._file.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{self.path.name}: unreadable safetensors header ({e})") from None
        header.pop("__metadata__", None)
        return header, 8 + n

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._entries[key]["shape"])

    def _dtype_of(self, key: str, entry: dict) -> torch.dtype:
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise SafetensorsError(f"{self.path.name}: tensor {key!r} has dtype {entry['dtype']}, which qwenvl "
                                   f"does not read (supported: {', '.join(_DTYPES)})")
        return dtype

    def _checked_offsets(self, key: str, entry: dict, dtype: torch.dtype) -> tuple[int, int]:
        begin, end = entry["data_offsets"]
        need = math.prod(entry["shape"]) * torch.empty((), dtype=dtype).element_size()
        if need != end - begin:
            raise SafetensorsError(f"{self.path.name}: tensor {key!r} holds {end - begin} bytes, its shape "
                                   f"{entry['shape']} and dtype {entry['dtype']} need {need}")
        return begin, end

    def get_tensor(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        dtype = self._dtype_of(key, entry)
        begin, end = self._checked_offsets(key, entry, dtype)
        out = torch.empty(entry["shape"], dtype=dtype)
        if end > begin:
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            self._file.seek(self._data_start + begin)
            if self._file.readinto(view) != end - begin:
                raise SafetensorsError(f"{self.path.name}: truncated while reading tensor {key!r}")
        return out

    def get_slice(self, key: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """The tensor's [start, stop) along `dim`, reading only those bytes (a tensor-parallel rank's shard:
        one read for dim 0, one per leading index otherwise); never the whole tensor."""
        entry = self._entries[key]
        dtype = self._dtype_of(key, entry)
        begin, _ = self._checked_offsets(key, entry, dtype)
        shape = list(entry["shape"])
        if not 0 <= dim < len(shape) or not 0 <= start <= stop <= shape[dim]:
            raise SafetensorsError(f"{self.path.name}: cannot slice tensor {key!r} of shape {shape} "
                                   f"at dim {dim}, [{start}, {stop})")
        item = torch.empty((), dtype=dtype).element_size()
        inner = math.prod(shape[dim + 1:]) * item              # bytes of one index along `dim`
        run, stride = (stop - start) * inner, shape[dim] * inner
        out = torch.empty(shape[:dim] + [stop - start] + shape[dim + 1:], dtype=dtype)
        if run == 0 or out.numel() == 0:
            return out
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        for i in range(math.prod(shape[:dim])):                   # [outer, dim, inner]: a run per outer index
            self._file.seek(self._data_start + begin + i * stride + start * inner)
            if self._file.readinto(view[i * run:(i + 1) * run]) != run:
                raise SafetensorsError(f"{self.path.name}: truncated while reading tensor {key!r}")
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
