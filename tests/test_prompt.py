"""build_inputs vs transformers' processor on the same tiny checkpoint folder; video token layout; hashes."""

import types

import numpy as np
import pytest
import torch
from PIL import Image
from qwenvl.models.registry import config_from_dir
from qwenvl.inputs import InputError, PreprocessorConfig, build_inputs
from qwenvl.tokenizer import Tokenizer
from tiny import make_checkpoint


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def ckpt(request, tmp_path_factory):
    d = make_checkpoint(tmp_path_factory.mktemp("ckpt"), request.param)
    return request.param, d, Tokenizer.from_dir(d), config_from_dir(d), PreprocessorConfig.from_dir(d)


def _image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _hf_processor(family, d, monkeypatch):
    """transformers' processor for the folder, built by hand: AutoProcessor insists on the torchvision
    video processor, which this environment lacks; images go through the PIL image processor."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    monkeypatch.setattr(transformers.processing_utils.ProcessorMixin, "check_argument_for_proper_class",
                        lambda self, name, arg: None)
    cls = {"qwen2_vl": transformers.Qwen2VLProcessor, "qwen2_5_vl": transformers.Qwen2_5_VLProcessor,
           "qwen3_vl": transformers.Qwen3VLProcessor}[family]
    return cls(image_processor=AutoImageProcessor.from_pretrained(str(d), backend="pil"),
               tokenizer=AutoTokenizer.from_pretrained(str(d)), video_processor=None,
               chat_template=(d / "chat_template.jinja").read_text())


def _hf_rope(family, cfg_dir, input_ids, mm_types, grids):
    import transformers
    cls = {"qwen2_vl": transformers.Qwen2VLModel, "qwen2_5_vl": transformers.Qwen2_5_VLModel,
           "qwen3_vl": transformers.Qwen3VLModel}[family]
    fake = types.SimpleNamespace(config=transformers.AutoConfig.from_pretrained(str(cfg_dir)))
    fake.get_vision_position_ids = lambda *a, **k: cls.get_vision_position_ids(fake, *a, **k)
    pos, _ = cls.get_rope_index(fake, input_ids, mm_types, image_grid_thw=grids)
    return pos[:, 0]


def test_one_and_two_image_prompts_equal_transformers(ckpt, monkeypatch):
    family, d, tok, cfg, pre = ckpt
    proc = _hf_processor(family, d, monkeypatch)
    img, img2 = _image(150, 100), _image(40, 300, seed=1)
    cases = [
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}},
                                       {"type": "text", "text": "What is in the picture?"}]}], [img]),
        ([{"role": "system", "content": "你好"},
          {"role": "user", "content": [{"image": img}, {"text": "and"}, {"image": img2}, {"text": "why?"}]}],
         [img, img2]),
    ]
    for messages, images in cases:
        ours = build_inputs(messages, tok, cfg, pre)
        hf_conv = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
                    [{"type": "image"} if ("image" in p or "image_url" in p) else {"type": "text", "text": p["text"]}
                     for p in m["content"]]} for m in messages]
        text = proc.apply_chat_template(hf_conv, add_generation_prompt=True, tokenize=False)
        ref = proc(text=[text], images=images, return_tensors="pt")
        assert ours.token_ids == ref["input_ids"][0].tolist()
        assert torch.equal(torch.cat([v.pixel_values for v in ours.vision]), ref["pixel_values"])
        assert [v.grid_thw for v in ours.vision] == [tuple(g) for g in ref["image_grid_thw"].tolist()]
        ref_pos = _hf_rope(family, d, ref["input_ids"], ref["mm_token_type_ids"], ref["image_grid_thw"])
        assert torch.equal(ours.positions, ref_pos)
        assert ours.next_position == int(ref_pos.max()) + 1
        for v in ours.vision:
            assert ours.token_ids[v.token_offset:v.token_offset + v.num_tokens] == [cfg.image_token_id] * v.num_tokens
            assert ours.token_ids[v.token_offset - 1] == cfg.vision_start_token_id
        assert ours.vision[0].original_size == (150, 100)
        w, h = ours.vision[0].input_size
        assert (h // pre.patch_size, w // pre.patch_size) == ours.vision[0].grid_thw[1:]


def test_content_hash_and_per_image_pixels(ckpt):
    family, d, tok, cfg, pre = ckpt
    img = _image(200, 120)

    def one(part):
        return build_inputs([{"role": "user", "content": [part, {"text": "hi"}]}], tok, cfg, pre).vision[0]

    a, b = one({"image": img}), one({"image": img.copy()})
    assert a.content_hash == b.content_hash and len(a.content_hash) == 64
    assert one({"image": _image(200, 120, seed=5)}).content_hash != a.content_hash
    small = one({"image": img, "max_pixels": pre.min_pixels})
    assert small.content_hash != a.content_hash and small.num_tokens < a.num_tokens
    assert small.num_tokens == small.grid_thw[1] * small.grid_thw[2] // 4


def test_video_layout(ckpt):
    family, d, tok, cfg, pre = ckpt
    frames = [_image(64, 64, seed=i) for i in range(5)]        # 5 frames -> padded to 6 -> t = 3
    out = build_inputs([{"role": "user", "content": [{"video": frames}, {"text": "what happens?"}]}],
                       tok, cfg, pre)
    (v,) = out.vision
    t, h, w = v.grid_thw
    assert v.kind == "video" and t == 3 and v.num_tokens == t * h * w // 4
    per_frame = h * w // 4
    assert out.token_ids.count(cfg.video_token_id) == v.num_tokens
    assert len(out.token_ids) == out.positions.shape[1]
    text = tok.decode(out.token_ids)
    if family == "qwen3_vl":
        # one timestamped start/pads/end group per temporal patch; times are the mean of each pair of frames
        starts = [i for i, x in enumerate(out.token_ids) if x == cfg.vision_start_token_id]
        assert len(starts) == 3
        raw = tok._tok.decode(out.token_ids, skip_special_tokens=False)
        assert "<0.2 seconds><|vision_start|>" in raw and "<1.2 seconds>" in raw and "<2.0 seconds>" in raw
        assert "<|vision_end|><|vision_end|>" not in raw
        # each frame is its own t == 1 span: the text between frames moves positions on
        first = v.token_offset
        assert out.positions[0, first] == out.positions[0, first + per_frame - 1]
    else:
        seg = out.positions[:, v.token_offset:v.token_offset + v.num_tokens]
        step = 2 if family == "qwen2_5_vl" else 1        # tokens_per_second 2 * (2 frames / 2 fps)
        assert seg[0, ::per_frame].tolist() == [seg[0, 0].item() + step * i for i in range(3)]
        after = out.positions[:, v.token_offset + v.num_tokens]
        assert after.tolist() == [int(seg.max()) + 1] * 3
    assert "what happens?" in text


def test_errors(ckpt):
    family, d, tok, cfg, pre = ckpt
    with pytest.raises(InputError, match="fetched by the HTTP server"):
        build_inputs([{"role": "user", "content": [{"video": "https://x/v.mp4"}]}], tok, cfg, pre)
    with pytest.raises(InputError, match="slots"):
        build_inputs([{"role": "user", "content": "<|image_pad|> hi"}], tok, cfg, pre)
    with pytest.raises(InputError, match="not found"):
        build_inputs([{"role": "user", "content": [{"image": "/nonexistent.png"}]}], tok, cfg, pre)


def test_video_file_hash_and_layout_follow_the_sampling(ckpt, tmp_path):
    """A video file: pads for its sampled grid; the same file sampled at another rate is another item for the
    caches (other positions or timestamps), the same sampling the same item."""
    from video_files import write_video
    family, d, tok, cfg, pre = ckpt
    clip = write_video(tmp_path / "clip.mp4", seconds=3, fps=10)

    def one(**opts):
        out = build_inputs([{"role": "user", "content": [{"video": str(clip), "min_pixels": 1024,
                                                          "max_pixels": 4096, **opts}, {"text": "hi"}]}],
                           tok, cfg, pre)
        (v,) = out.vision
        assert out.token_ids.count(cfg.video_token_id) == v.num_tokens
        return v
    a, b, c = one(fps=2.0), one(nframes=6), one(fps=1.0)
    assert a.grid_thw[0] == 3 and c.grid_thw[0] == 2          # 30 frames at 10 fps: 6 frames, then 3 -> 4
    assert a.content_hash == b.content_hash                    # nframes 6 picks the same frames as fps 2
    assert a.content_hash != c.content_hash
    # The very same frames said to be sampled at another rate: same pixels, other positions/timestamps.
    frames = [_image(64, 64, seed=i) for i in range(4)]
    items = [build_inputs([{"role": "user", "content": [{"video": frames, "fps": fps}]}], tok, cfg, pre).vision[0]
             for fps in (1.0, 2.0)]
    assert torch.equal(items[0].pixel_values, items[1].pixel_values)
    assert items[0].content_hash != items[1].content_hash
