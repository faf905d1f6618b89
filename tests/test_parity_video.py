"""A video FILE end to end against transformers, on tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints.

Ours: `LLM.chat` on `{"video": "clip.mp4", ...}` (PyAV decode, qwen-vl-utils sampling and sizing, patchify,
prompt, M-RoPE, engine). Reference: transformers' model fed the frames our reader returned, patchified by
transformers' image processor (hf_reference.py; the frames are already at a multiple of 28/32, so it does not
resize them), with the timing qwen-vl-utils hands the processor: Qwen2.5-VL's second_per_grid_ts =
temporal_patch_size / sample_fps, Qwen3-VL's `<t seconds>` from frame index / video fps.
The prompt ids, pixels and 3-row positions are compared first, then the greedy tokens. Frames are sized so
that the video's spatial extent exceeds its temporal extent, where transformers' rule for the text after a
video equals the original Qwen rule we follow (DESIGN.md section 4; tests/test_prompt.py covers the rule).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from hf_reference import build_ref_inputs
from qwenvl import LLM, SamplingParams
from qwenvl.inputs import build_inputs
from qwenvl.inputs.video import VideoOptions, read_video
from tiny import load_hf_model
from video_files import write_video

STEPS = 12
# 240x180 at 10 fps for 4 s (40 frames); fps 1.5 -> 6 frames (3 temporal patches) sampled at 1.5 fps, not
# the default 2; 224x168 (factor 28) or 224x160 (factor 32) per frame, wider than the video is long.
OPTIONS = {"fps": 1.5, "min_pixels": 3136, "max_pixels": 224 * 168}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("clip") / "clip.mp4", seconds=4, fps=10, width=240, height=180)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_video_file_greedy_matches_transformers(tiny_checkpoint, clip, family):
    path = tiny_checkpoint(family)
    question = "What happens in the video?"
    messages = [{"role": "user", "content": [{"type": "video", "video": str(clip), **OPTIONS},
                                             {"type": "text", "text": question}]}]
    llm = LLM(path, dtype="float32", device="cpu")
    engine = llm.engine
    ours = build_inputs(messages, engine.tokenizer, engine.cfg, engine.preprocessor)

    pre = engine.preprocessor
    video = read_video(clip, VideoOptions(**OPTIONS), pre.patch_size, pre.merge_size)
    assert video.frame_indices == [0, 8, 16, 23, 31, 39] and video.sample_fps == pytest.approx(1.5)
    frames = [Image.fromarray(f) for f in video.frames]
    qwen3 = family == "qwen3_vl"
    stamps = None
    if qwen3:
        secs = video.timestamps()
        stamps = [(secs[i] + secs[i + 1]) / 2 for i in range(0, len(secs), 2)]
    ref = build_ref_inputs(path, video_frames=frames, question=question, video_timestamps=stamps)
    hf = load_hf_model(path)
    extra = {}
    if family == "qwen2_5_vl":
        extra["second_per_grid_ts"] = torch.tensor([pre.temporal_patch_size / video.sample_fps])

    (item,) = ours.vision
    assert ours.token_ids == ref.input_ids[0].tolist()
    assert list(item.grid_thw) == ref.video_grid_thw[0].tolist() and item.grid_thw[0] == 3
    assert (item.pixel_values - ref.pixel_values_videos).abs().max().item() < 1e-5
    hf_pos, _ = hf.model.get_rope_index(ref.input_ids, mm_token_type_ids=ref.mm_token_type_ids,
                                        video_grid_thw=ref.video_grid_thw, **extra)
    assert torch.equal(ours.positions, hf_pos[:, 0])
    if family == "qwen2_5_vl":   # temporal rows spaced by real time: 2 tokens/s * 4/3 s per patch, floored
        seg = ours.positions[0, item.token_offset:item.token_offset + item.num_tokens]
        assert seg[::item.num_tokens // 3].tolist() == [seg[0].item() + d for d in (0, 2, 5)]
    if qwen3:                    # means of frames 0 and 8, ..., 31 and 39, at 10 fps
        text = engine.tokenizer.decode(ours.token_ids)
        assert "<0.4 seconds>" in text and "<3.5 seconds>" in text

    with torch.inference_mode():
        out = hf.generate(**ref.hf_kwargs(), **extra, max_new_tokens=STEPS, do_sample=False, eos_token_id=[],
                          pad_token_id=0)
    expected = out[0, ref.input_ids.shape[1]:].tolist()
    got = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True))
    assert len(expected) == STEPS
    assert got.token_ids == expected
