"""Preprocessing parity with transformers' PIL Qwen2VLImageProcessor, plus config and video handling."""

import json
import random

import numpy as np
import pytest
from PIL import Image

from qwenvl.inputs import InputError, PreprocessorConfig, smart_resize
from qwenvl.inputs.preprocess import preprocess_image, preprocess_video


def _hf_processor(**kw):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(**kw)


def _random_image(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    # Smooth gradients plus noise: bicubic overshoot and clipping both get exercised.
    yy, xx = np.mgrid[0:h, 0:w]
    base = (xx * 255 // max(w - 1, 1) + yy * 127 // max(h - 1, 1)) % 256
    noise = rng.integers(0, 256, size=(h, w, 3))
    arr = ((base[..., None] + noise) // 2).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _sizes():
    rng = random.Random(0)
    sizes = [(rng.randint(16, 900), rng.randint(16, 900)) for _ in range(12)]
    # extremes: 1:150-ish strips both ways, tiny images (upscaled to min_pixels), exact multiples
    sizes += [(28, 4200), (4200, 28), (28, 5000), (5, 900), (56, 56), (11, 13), (1, 200), (200, 1)]
    return sizes


@pytest.mark.parametrize("patch,mean", [(14, None), (16, (0.5, 0.5, 0.5))])
def test_pixel_values_equal_transformers(patch, mean):
    rng = np.random.default_rng(0)
    kw = {"patch_size": patch}
    if mean:
        kw.update(image_mean=list(mean), image_std=list(mean))
    hf = _hf_processor(**kw)
    cfg = PreprocessorConfig(patch_size=patch, **({"image_mean": mean, "image_std": mean} if mean else {}))
    worst = 0.0
    for w, h in _sizes():
        img = _random_image(rng, w, h)
        ours = preprocess_image(img, cfg)
        ref = hf(images=[img], return_tensors="np")
        assert tuple(ref["image_grid_thw"][0]) == ours.grid_thw, (w, h)
        assert ref["pixel_values"].shape == ours.pixel_values.shape
        worst = max(worst, float(np.abs(ref["pixel_values"] - ours.pixel_values).max()))
    assert worst == 0.0


def test_big_image_and_per_image_override_equal_transformers():
    rng = np.random.default_rng(1)
    img = _random_image(rng, 2600, 1700)          # 4.4 MP, kept big by a large max_pixels
    big = 2600 * 1700 + 10_000
    hf = _hf_processor(max_pixels=big)
    ours = preprocess_image(img, PreprocessorConfig(), max_pixels=big)
    ref = hf(images=[img], return_tensors="np")
    assert tuple(ref["image_grid_thw"][0]) == ours.grid_thw
    assert ours.input_size[0] * ours.input_size[1] > 4_000_000
    assert np.array_equal(ref["pixel_values"], ours.pixel_values)


def test_smart_resize_rules():
    assert smart_resize(100, 100, 28, 56 * 56, 28 * 28 * 1280) == (112, 112)
    h, w = smart_resize(4000, 3000, 28, 56 * 56, 28 * 28 * 1280)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 28 * 28 * 1280
    h, w = smart_resize(10, 10, 32, 64 * 64, 10 ** 7)
    assert h % 32 == 0 and h * w >= 64 * 64
    with pytest.raises(InputError, match="aspect ratio"):
        smart_resize(10, 2500, 28, 56 * 56, 28 * 28 * 1280)
    with pytest.raises(ValueError):
        smart_resize(2500, 10, 28, 56 * 56, 28 * 28 * 1280)


def test_from_dir_layouts(tmp_path):
    old = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
           "merge_size": 2, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(old))
    cfg = PreprocessorConfig.from_dir(tmp_path)
    assert (cfg.min_pixels, cfg.max_pixels, cfg.factor) == (3136, 12845056, 28)
    assert cfg.image_mean == (0.1, 0.2, 0.3) and cfg.image_std == (0.4, 0.5, 0.6)
    new = {"size": {"shortest_edge": 65536, "longest_edge": 16777216}, "patch_size": 16,
           "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(new))
    (tmp_path / "video_preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 4096, "longest_edge": 65536}}))
    cfg = PreprocessorConfig.from_dir(tmp_path)
    assert (cfg.min_pixels, cfg.max_pixels, cfg.patch_size, cfg.factor) == (65536, 16777216, 16, 32)
    assert (cfg.video_min_pixels, cfg.video_max_pixels) == (4096, 65536)
    with pytest.raises(InputError, match="preprocessor_config.json"):
        PreprocessorConfig.from_dir(tmp_path / "nope")


def test_video_frames_common_size_and_odd_padding():
    rng = np.random.default_rng(2)
    frames = [_random_image(rng, 120, 90) for _ in range(2)] + [_random_image(rng, 130, 95)]
    cfg = PreprocessorConfig(video_min_pixels=56 * 56, video_max_pixels=112 * 112)
    out = preprocess_video(frames, cfg)
    t, gh, gw = out.grid_thw
    assert t == 2                                   # 3 frames -> padded to 4 -> 2 temporal patches
    assert out.pixel_values.shape == (t * gh * gw, 3 * 2 * 14 * 14)
    # The padded 4th frame repeats the 3rd: in the second temporal patch both time slices are equal.
    rows = out.pixel_values[gh * gw:].reshape(-1, 3, 2, 14 * 14)
    assert np.array_equal(rows[:, :, 0], rows[:, :, 1])
    # A still image is a video of T identical frames.
    img = preprocess_image(frames[0], cfg, 56 * 56, 112 * 112)
    vid = preprocess_video([frames[0]] * 2, cfg, 56 * 56, 112 * 112)
    assert np.array_equal(img.pixel_values, vid.pixel_values) and img.grid_thw == vid.grid_thw
