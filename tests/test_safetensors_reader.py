"""Our plain-read safetensors reader against the safetensors package's own writer."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from qwenvl.checkpoints.safetensors_reader import SafetensorsError, SafetensorsReader


def test_reads_every_dtype_and_shape_the_writer_wrote(tmp_path):
    tensors = {
        "a.bf16": torch.randn(3, 5).to(torch.bfloat16), "b.f32": torch.randn(7), "c.f16": torch.randn(2, 2, 2).half(),
        "d.i8": torch.randint(-128, 127, (4, 4), dtype=torch.int8), "e.i32": torch.randint(0, 1 << 30, (6,), dtype=torch.int32),
        "f.u8": torch.randint(0, 255, (9,), dtype=torch.uint8), "g.scalar": torch.tensor(2.5),
        "h.empty": torch.zeros(0, 4), "i.fp8": torch.randn(4, 8).to(torch.float8_e4m3fn),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    with SafetensorsReader(path) as f:
        assert sorted(f.keys()) == sorted(tensors)
        for k, t in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def test_truncated_and_garbage_files_are_clear_errors(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with SafetensorsReader(path) as f, pytest.raises(SafetensorsError, match="truncated"):
        f.get_tensor("w")
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(SafetensorsError, match="not a safetensors file"):
        SafetensorsReader(path)
