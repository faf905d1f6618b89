"""What a time-limited run leaves behind while it trains: the model as a tar and a JSONL metrics log.

A lent machine's command is killed at its time limit and only files under one output folder come back, a
few at most, each under a size limit. So every `every_s` seconds (and at the end) the current weights are
exported as an ordinary checkpoint folder and packed into ONE file, `model.tar` (unpack with
`tar xf model.tar` -> `model/`), replaced atomically so a kill never leaves half a model; a model too big
for one file is cut into `model.tar.00`, `model.tar.01`, ... (`cat model.tar.* | tar x` joins them). The
metrics log gets one JSON line per step record, flushed as written, so it is complete up to the kill.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

MODEL_TAR = "model.tar"
METRICS_LOG = "metrics.jsonl"
PART_BYTES = 15 << 20            # under the 16 MiB a file the device tool brings back


class MetricsLog:
    """Appends one JSON object a line to `path` (created with its folder), flushed at every line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def write_model_tar(folder: str | Path, dst_dir: str | Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """Pack checkpoint `folder` as `model/` into dst_dir/model.tar (or numbered parts of at most
    `part_bytes`), each file written beside its final name and renamed over it; stale files of the other
    form are removed. -> the files written."""
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for f in sorted(Path(folder).iterdir()):
            if f.is_file():
                tar.add(f, arcname=f"model/{f.name}")
    data = buffer.getvalue()
    pieces = [data] if len(data) <= part_bytes else [data[i:i + part_bytes] for i in range(0, len(data), part_bytes)]
    names = [MODEL_TAR] if len(pieces) == 1 else [f"{MODEL_TAR}.{i:02d}" for i in range(len(pieces))]
    written = []
    for name, piece in zip(names, pieces):
        tmp = dst / f".{name}.tmp"
        tmp.write_bytes(piece)
        tmp.replace(dst / name)
        written.append(dst / name)
    for stale in [dst / MODEL_TAR, *dst.glob(f"{MODEL_TAR}.*")]:
        if stale not in written and stale.is_file():
            stale.unlink()
    return written


def read_model_tar(src_dir: str | Path, dst_dir: str | Path) -> Path:
    """The checkpoint folder packed by write_model_tar in `src_dir`, unpacked into dst_dir/model."""
    src = Path(src_dir)
    parts = [src / MODEL_TAR] if (src / MODEL_TAR).is_file() else sorted(src.glob(f"{MODEL_TAR}.[0-9]*"))
    if not parts:
        raise FileNotFoundError(f"no {MODEL_TAR} (or {MODEL_TAR}.00, ...) in {src}")
    data = b"".join(p.read_bytes() for p in parts)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        tar.extractall(dst_dir, filter="data")
    return Path(dst_dir) / "model"


class Snapshots:
    """Every `every_s` seconds of training (and when asked at the end), `export(folder)` into a scratch
    folder, then packed into `dst_dir` by write_model_tar."""

    def __init__(self, dst_dir: str | Path, every_s: float, export, log=print):
        self.dst_dir, self.every_s, self.export, self.log = Path(dst_dir), every_s, export, log
        self.last = time.time()

    def due(self) -> bool:
        return self.every_s > 0 and time.time() - self.last >= self.every_s

    def take(self, step: int) -> list[Path]:
        t = time.time()
        scratch = Path(tempfile.mkdtemp(prefix="qwenvl-snapshot-"))
        try:
            self.export(scratch)
            written = write_model_tar(scratch, self.dst_dir)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self.last = time.time()
        size = sum(p.stat().st_size for p in written)
        self.log(f"step {step}: model written to {written[0] if len(written) == 1 else self.dst_dir} "
                 f"({size / 1e6:.1f} MB, {self.last - t:.1f} s)")
        return written
