"""Parity of our Qwen3-VL with transformers' Qwen3VLForConditionalGeneration on a tiny random checkpoint.

The checkpoint comes from tests/tiny.py; its weights are perturbed (norm weights away from 1, biases away
from 0, the learned position table) and saved again, so a misplaced norm or bias cannot hide. Ours is
loaded by qwenvl.loader, the reference by transformers from the same folder.

Inputs are built with transformers' own pieces: the checkpoint's chat template through its tokenizer,
the PIL image processor for pixel_values, and `get_rope_index` for the 3-row positions. The full
Qwen3VLProcessor needs torchvision (for its video processor), which this environment lacks, so the
placeholder expansion the processor does is repeated here (`<|image_pad|>` x t*h*w/4; a video becomes
one `<{t:.1f} seconds><|vision_start|><|video_pad|>...<|vision_end|>` group per temporal patch).

Video positions: transformers 5.x's Qwen3-VL (like the original Qwen3-VL code) splits a video into
one t=1 grid per temporal patch, separated by timestamp text, so each frame group's t/h/w rows start
at max(previous)+1 like an image does. The model-level checks below use the positions transformers
computes, whatever rule produced them; the input pipeline has its own tests for the rule.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from PIL import Image  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402

from qwenvl.layers.attention import ContiguousKVCache  # noqa: E402
from qwenvl.checkpoints.loader import load_model  # noqa: E402
from tiny import load_hf_model, make_checkpoint  # noqa: E402  (tests/ is on sys.path via conftest)

TOL = 1e-4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.set_num_threads(1)
    d = make_checkpoint(tmp_path_factory.mktemp("q3"), "qwen3_vl")
    hf = load_hf_model(d)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            scale = 0.1 if ("norm" in name or name.endswith("bias") or "pos_embed" in name) else 0.02
            p.add_(torch.randn(p.shape, generator=g) * scale)
    hf.save_pretrained(d)
    hf = load_hf_model(d)
    ours, cfg = load_model(d)
    tok = AutoTokenizer.from_pretrained(d)
    proc = Qwen2VLImageProcessorPil.from_pretrained(d)
    return dict(dir=d, hf=hf, ours=ours, cfg=cfg, tok=tok, proc=proc)


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _video_pixels(proc, frames: int, h: int, w: int, seed: int):
    """pixel_values[P, C*T*ps*ps] of `frames` random frames (already at a patchable size), laid out
    as the video processor does: temporal patches, then 2x2 merge blocks, then channel/t/ps/ps."""
    ps, tp, m = proc.patch_size, proc.temporal_patch_size, proc.merge_size
    x = torch.randn(frames, 3, h, w, generator=torch.Generator().manual_seed(seed))
    gt, gh, gw = frames // tp, h // ps, w // ps
    x = x.view(gt, tp, 3, gh // m, m, ps, gw // m, m, ps)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)              # [gt, bh, bw, m, m, C, tp, ps, ps]
    return x.reshape(gt * gh * gw, 3 * tp * ps * ps), torch.tensor([[gt, gh, gw]])


def _build(ckpt, parts: list):
    """parts: PIL images, ("video", n_frames, h, w) tuples and strings, in prompt order.
    -> input_ids[1, N], mm_token_type_ids, pixel_values (images), image_grid_thw, video tensors."""
    tok, proc, cfg = ckpt["tok"], ckpt["proc"], ckpt["cfg"]
    content, images, videos = [], [], []
    for p in parts:
        if isinstance(p, str):
            content.append({"type": "text", "text": p})
        elif isinstance(p, tuple):
            content.append({"type": "video"})
            videos.append(_video_pixels(proc, *p[1:], seed=len(videos)))
        else:
            content.append({"type": "image"})
            images.append(p)
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                   tokenize=False)
    out = {}
    if images:
        im = proc(images=images, return_tensors="pt")
        out["pixel_values"], out["image_grid_thw"] = im["pixel_values"], im["image_grid_thw"]
        for thw in im["image_grid_thw"]:
            text = text.replace("<|image_pad|>", "<|IMG|>" * (int(thw.prod()) // 4), 1)
        text = text.replace("<|IMG|>", "<|image_pad|>")
    if videos:
        out["pixel_values_videos"] = torch.cat([v[0] for v in videos])
        out["video_grid_thw"] = torch.cat([v[1] for v in videos])
        for _, thw in videos:
            t, h, w = thw[0].tolist()
            per_frame = "".join(f"<{(2 * i + 0.5) / 24:.1f} seconds><|vision_start|>" + "<|VID|>" * (h * w // 4)
                                + "<|vision_end|>" for i in range(t))        # 24 fps, as the processor assumes
            text = text.replace("<|video_pad|>", per_frame, 1)
        text = text.replace("<|VID|>", "<|video_pad|>")
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    out["input_ids"] = ids
    out["mm_token_type_ids"] = ((ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int())
    return out


def _positions(hf, inputs):
    pos, _ = hf.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                     image_grid_thw=inputs.get("image_grid_thw"),
                                     video_grid_thw=inputs.get("video_grid_thw"))
    return pos[:, 0]                                       # [3, N]


def _vision(ours, inputs):
    """Our encoder over images and videos, rows merged back into prompt order (as the engine does)."""
    ids = inputs["input_ids"][0]
    feats = {}
    for key, grid_key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if key in inputs:
            feats[key] = ours.encode_vision(inputs[key], inputs[grid_key])
    if not feats:
        return None, []
    if len(feats) == 1:
        return next(iter(feats.values()))
    cfg = ours.cfg
    mask = (ids == cfg.image_token_id) | (ids == cfg.video_token_id)
    is_img = (ids[mask] == cfg.image_token_id)
    (ie, ids_), (ve, vds) = feats["pixel_values"], feats["pixel_values_videos"]

    def merge(a, b):
        out = a.new_empty(int(mask.sum()), a.shape[-1])
        out[is_img], out[~is_img] = a, b
        return out
    return merge(ie, ve), [merge(a, b) for a, b in zip(ids_, vds)]


def _prefill(ckpt, inputs):
    hf, ours, cfg = ckpt["hf"], ckpt["ours"], ckpt["cfg"]
    with torch.no_grad():
        ref = hf(**inputs).logits[0]
        embeds, deepstack = _vision(ours, inputs)
        cache = ContiguousKVCache(cfg.text.num_hidden_layers)
        pos = _positions(hf, inputs)
        logits = ours.compute_logits(ours(inputs["input_ids"][0], pos, cache, embeds, deepstack))
    return logits, ref, cache, pos


def test_prefill_one_image(ckpt):
    inputs = _build(ckpt, [_image(128, 96, 0), "Describe this image."])
    logits, ref, _, _ = _prefill(ckpt, inputs)
    assert logits.dtype == torch.float32 and logits.shape == ref.shape
    assert (logits - ref).abs().max().item() < TOL


@pytest.mark.parametrize("size", [(200, 60), (60, 490)])
def test_prefill_non_square(ckpt, size):
    inputs = _build(ckpt, [_image(*size, 1), "What is in the picture?"])
    t, h, w = inputs["image_grid_thw"][0].tolist()
    assert h != w                                          # the resampled position table is not square
    logits, ref, _, _ = _prefill(ckpt, inputs)
    assert (logits - ref).abs().max().item() < TOL


def test_prefill_two_images(ckpt):
    inputs = _build(ckpt, [_image(96, 64, 2), "and", _image(64, 160, 3), "Compare them."])
    assert len(inputs["image_grid_thw"]) == 2
    logits, ref, _, _ = _prefill(ckpt, inputs)
    assert (logits - ref).abs().max().item() < TOL


def test_prefill_video_four_frames(ckpt):
    inputs = _build(ckpt, [("video", 4, 64, 96), "What happens in the video?"])
    assert inputs["video_grid_thw"].tolist() == [[2, 4, 6]]
    logits, ref, _, _ = _prefill(ckpt, inputs)
    assert (logits - ref).abs().max().item() < TOL


def test_prefill_image_and_video(ckpt):
    # DeepStack rows of images and videos interleave in prompt order.
    inputs = _build(ckpt, [("video", 4, 64, 64), _image(96, 64, 4), "Describe both."])
    logits, ref, _, _ = _prefill(ckpt, inputs)
    assert (logits - ref).abs().max().item() < TOL


def test_greedy_32_tokens(ckpt):
    hf, ours = ckpt["hf"], ckpt["ours"]
    inputs = _build(ckpt, [_image(160, 96, 5), "Describe this image."])
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        hf.generation_config.eos_token_id = None           # compare 32 tokens even if eos comes first
        ref = hf.generate(**inputs, max_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, n:].tolist()
        logits, _, cache, pos = _prefill(ckpt, inputs)
        next_position = int(pos.max()) + 1
        got = [int(logits[-1].argmax())]
        for i in range(31):
            p = torch.full((3, 1), next_position + i)      # decode step i: next_position + i on all rows
            h = ours(torch.tensor([got[-1]]), p, cache)
            got.append(int(ours.compute_logits(h)[-1].argmax()))
    assert len(ref) == 32
    assert got == ref


def test_bfloat16_close_to_float32(ckpt):
    ours32, cfg = ckpt["ours"], ckpt["cfg"]
    ours16, _ = load_model(ckpt["dir"], dtype="bfloat16")
    assert ours16.model.visual.pos_embed.weight.dtype == torch.bfloat16
    inputs = _build(ckpt, [_image(96, 96, 6), "Describe."])
    pos = _positions(ckpt["hf"], inputs)
    with torch.no_grad():
        out = []
        for m in (ours32, ours16):
            e, ds = m.encode_vision(inputs["pixel_values"], inputs["image_grid_thw"])
            h = m(inputs["input_ids"][0], pos, ContiguousKVCache(cfg.text.num_hidden_layers), e, ds)
            out.append(m.compute_logits(h))
    assert out[1].dtype == torch.float32
    assert (out[0] - out[1]).abs().max().item() < 0.1 * out[0].abs().max().item() + 0.05


def test_mismatched_vision_rows_raise(ckpt):
    ours, cfg = ckpt["ours"], ckpt["cfg"]
    inputs = _build(ckpt, [_image(64, 64, 7), "Hi"])
    e, ds = ours.encode_vision(inputs["pixel_values"], inputs["image_grid_thw"])
    with pytest.raises(ValueError, match="pad tokens"):
        ours(inputs["input_ids"][0], _positions(ckpt["hf"], inputs),
             ContiguousKVCache(cfg.text.num_hidden_layers), e[:-1], [d[:-1] for d in ds])
    with pytest.raises(ValueError, match="DeepStack"):
        ours(inputs["input_ids"][0], _positions(ckpt["hf"], inputs),
             ContiguousKVCache(cfg.text.num_hidden_layers), e, [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-3), ("bfloat16", 0.15)])
def test_cuda_matches_cpu(ckpt, dtype, tol):
    ours_gpu, cfg = load_model(ckpt["dir"], dtype=dtype, device="cuda")
    inputs = _build(ckpt, [_image(200, 60, 8), ("video", 4, 64, 64), "Describe."])
    logits_cpu, _, _, pos = _prefill(ckpt, inputs)
    gpu_inputs = {k: v.cuda() for k, v in inputs.items()}
    with torch.no_grad():
        embeds, deepstack = _vision(ours_gpu, gpu_inputs)
        h = ours_gpu(gpu_inputs["input_ids"][0], pos.cuda(), ContiguousKVCache(cfg.text.num_hidden_layers),
                     embeds, deepstack)
        logits = ours_gpu.compute_logits(h).cpu()
    assert logits.dtype == torch.float32
    assert (logits - logits_cpu).abs().max().item() < tol


def test_chunked_prefill_splits_vision_rows(ckpt):
    """A prefill chunk boundary inside an image: each chunk gets only the rows of its own pads."""
    ours, cfg = ckpt["ours"], ckpt["cfg"]
    inputs = _build(ckpt, [_image(128, 128, 9), "Describe this image."])
    full, ref, _, pos = _prefill(ckpt, inputs)
    ids = inputs["input_ids"][0]
    pads = (ids == cfg.image_token_id).nonzero()[:, 0]
    cut = int(pads[len(pads) // 3])                        # mid-image
    with torch.no_grad():
        embeds, deepstack = ours.encode_vision(inputs["pixel_values"], inputs["image_grid_thw"])
        k = int((ids[:cut] == cfg.image_token_id).sum())
        cache = ContiguousKVCache(cfg.text.num_hidden_layers)
        h1 = ours(ids[:cut], pos[:, :cut], cache, embeds[:k], [d[:k] for d in deepstack])
        h2 = ours(ids[cut:], pos[:, cut:], cache, embeds[k:], [d[k:] for d in deepstack])
        logits = ours.compute_logits(torch.cat([h1, h2]))
    assert (logits - ref).abs().max().item() < TOL


def test_text_only(ckpt):
    hf, ours, cfg = ckpt["hf"], ckpt["ours"], ckpt["cfg"]
    ids = torch.tensor([ckpt["tok"]("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    with torch.no_grad():
        ref = hf(input_ids=ids).logits[0]
        pos = torch.arange(ids.shape[1]).expand(3, -1)
        logits = ours.compute_logits(ours(ids[0], pos, ContiguousKVCache(cfg.text.num_hidden_layers)))
    assert (logits - ref).abs().max().item() < TOL


@pytest.mark.parametrize("layout,sharded", [("flat", False), ("current", True)])
def test_layouts_load_and_match(tmp_path, layout, sharded):
    """The original Hub config layout (rope_scaling + rope_theta) and sharded weights."""
    d = make_checkpoint(tmp_path, "qwen3_vl", layout=layout, sharded=sharded, seed=3)
    ours, cfg = load_model(d)
    assert cfg.text.mrope_interleaved and cfg.text.head_dim == 16
    hf = load_hf_model(d)
    ckpt = dict(hf=hf, ours=ours, cfg=cfg, tok=AutoTokenizer.from_pretrained(d),
                proc=Qwen2VLImageProcessorPil.from_pretrained(d))
    logits, ref, _, _ = _prefill(ckpt, _build(ckpt, [_image(96, 64, 10), "Describe."]))
    assert (logits - ref).abs().max().item() < TOL


def test_tied_word_embeddings(ckpt, tmp_path):
    """Qwen3-VL-2B/4B tie lm_head to the embeddings; their checkpoints hold no lm_head.weight."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    hc = Qwen3VLConfig.from_pretrained(ckpt["dir"])
    hc.tie_word_embeddings = True
    tied = Qwen3VLForConditionalGeneration(hc).eval()
    state = {k: v for k, v in ckpt["hf"].state_dict().items() if k != "lm_head.weight"}
    tied.load_state_dict(state, strict=False)
    tied.tie_weights()
    tied.save_pretrained(tmp_path)
    ours, cfg = load_model(tmp_path)
    assert cfg.text.tie_word_embeddings
    hf = load_hf_model(tmp_path)
    c = dict(ckpt, hf=hf, ours=ours, cfg=cfg)
    logits, ref, _, _ = _prefill(c, _build(c, [_image(64, 96, 11), "Describe."]))
    assert (logits - ref).abs().max().item() < TOL
