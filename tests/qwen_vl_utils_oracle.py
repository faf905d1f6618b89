"""qwen-vl-utils' own vision_process, importable here as a test oracle (it is not a qwenvl dependency).

It imports torchvision at module level, which this environment must not install, and reads videos with
decord / torchcodec / torchvision. Only its pure rules and its `fetch_video` flow are used, so the oracle
gets stand-ins: a `torchvision` whose `transforms.functional.resize` is torchvision's tensor resize
(float interpolate, clamp, round), and a `decord` whose VideoReader decodes every frame with PyAV.
`load()` returns the module or None when qwen-vl-utils is not installed; `fetch_video()` calls it.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import av
import numpy as np
import torch


def _resize(video, size, interpolation=None, antialias=True):
    """torchvision.transforms.functional.resize on a uint8 [T, C, H, W] tensor (bicubic, antialias)."""
    if list(video.shape[-2:]) == list(size):
        return video
    y = torch.nn.functional.interpolate(video.float(), size=size, mode="bicubic", align_corners=False,
                                        antialias=antialias)
    return y.clamp(0, 255).round().to(video.dtype)


class _DecordReader:
    """The slice of decord.VideoReader that qwen-vl-utils calls, over PyAV decoding every frame."""

    def __init__(self, path: str):
        with av.open(path) as container:
            self._fps = float(container.streams.video[0].average_rate)
            self._frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]

    def __len__(self) -> int:
        return len(self._frames)

    def get_avg_fps(self) -> float:
        return self._fps

    def get_batch(self, idx):
        batch = np.stack([self._frames[i] for i in idx])
        return types.SimpleNamespace(asnumpy=lambda: batch)


def load():
    if importlib.util.find_spec("qwen_vl_utils") is None:
        return None
    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.0"
    tv_io, tv_tr = types.ModuleType("torchvision.io"), types.ModuleType("torchvision.transforms")
    tv_tr.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
    tv_tr.functional = types.SimpleNamespace(resize=_resize)
    tv.io, tv.transforms = tv_io, tv_tr
    names = ("torchvision", "torchvision.io", "torchvision.transforms")
    saved = {k: sys.modules.get(k) for k in names}
    sys.modules.update(dict(zip(names, (tv, tv_io, tv_tr))))
    try:
        import qwen_vl_utils.vision_process as vp
    finally:
        for k, v in saved.items():      # leave no fake torchvision behind for other tests
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    vp.get_video_reader_backend = lambda: "decord"
    return vp


def fetch_video(vp, ele: dict, patch_size: int):
    """qwen-vl-utils' fetch_video with the stand-in decord present only for this call
    -> (frames uint8 [T, H, W, 3], frame indices, sample_fps)."""
    saved = sys.modules.get("decord")
    sys.modules["decord"] = types.SimpleNamespace(VideoReader=_DecordReader)
    try:
        (video, meta), sample_fps = vp.fetch_video(ele, image_patch_size=patch_size, return_video_sample_fps=True,
                                                   return_video_metadata=True)
    finally:
        if saved is None:
            sys.modules.pop("decord", None)
        else:
            sys.modules["decord"] = saved
    frames = video.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return frames, list(meta["frames_indices"]), sample_fps
