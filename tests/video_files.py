"""Short test videos written with PyAV: a few seconds, a few dozen pixels, frames that differ."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def write_video(path: str | Path, seconds: float = 2.0, fps: int = 10, width: int = 64, height: int = 48,
                codec: str = "mpeg4") -> Path:
    """Frame i: a red level of 8*i, a green bar i*2 pixels wide, random blue noise (seed i)."""
    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(round(seconds * fps)):
            frame = np.zeros((height, width, 3), np.uint8)
            frame[..., 0] = (i * 8) % 256
            frame[:, : (i * 2) % width, 1] = 255
            frame[..., 2] = np.random.default_rng(i).integers(0, 256, (height, width), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decode_all(path: str | Path) -> list[np.ndarray]:
    """Every frame as uint8 RGB, to check the reader's picks against."""
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
