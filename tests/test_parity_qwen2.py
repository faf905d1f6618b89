"""Parity with transformers for Qwen2-VL and Qwen2.5-VL on tiny random checkpoints loaded by our loader.

Inputs (ids, pixel values, 3-row positions) come from transformers' image processor, tokenizer and
get_rope_index, so only the model code is under test here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hf_reference import build_ref_inputs
from qwenvl.layers.attention import ContiguousKVCache
from qwenvl.checkpoints.loader import load_model
from tiny import load_hf_model

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
ATOL = 1e-4


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8"))


def _hf_positions(hf, ref) -> torch.Tensor:
    kwargs = {}
    if ref.video_grid_thw is not None and hf.config.model_type == "qwen2_5_vl":
        kwargs["second_per_grid_ts"] = torch.tensor([1.0])
    pos, _ = hf.model.get_rope_index(ref.input_ids, mm_token_type_ids=ref.mm_token_type_ids,
                                     image_grid_thw=ref.image_grid_thw, video_grid_thw=ref.video_grid_thw, **kwargs)
    return pos                                                                 # [3, 1, N]


def _our_vision(model, ref) -> torch.Tensor | None:
    """Vision rows in prompt order: this prompt puts the images before the video."""
    parts = []
    if ref.pixel_values is not None:
        parts.append(model.encode_vision(ref.pixel_values, ref.image_grid_thw)[0])
    if ref.pixel_values_videos is not None:
        parts.append(model.encode_vision(ref.pixel_values_videos, ref.video_grid_thw)[0])
    return torch.cat(parts) if parts else None


def _compare_prefill(model_dir, hf_dir, ref, dtype=torch.float32) -> float:
    hf = load_hf_model(hf_dir)
    pos = _hf_positions(hf, ref)
    with torch.inference_mode():
        expected = hf(**ref.hf_kwargs(), position_ids=pos).logits[0]
        model, cfg = load_model(model_dir, dtype=dtype)
        hidden = model(ref.input_ids[0], pos[:, 0], ContiguousKVCache(cfg.text.num_hidden_layers),
                       _our_vision(model, ref), [])
        got = model.compute_logits(hidden)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    return (got - expected).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [(300, 200), (200, 60), (60, 490)])
def test_prefill_one_image(tiny_checkpoint, family, size):
    path = tiny_checkpoint(family)
    diff = _compare_prefill(path, path, build_ref_inputs(path, [_image(*size)]))
    assert diff < ATOL, f"{family} {size}: max abs logit diff {diff}"


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_two_images(tiny_checkpoint, family):
    path = tiny_checkpoint(family)
    ref = build_ref_inputs(path, [_image(300, 200, 1), _image(120, 340, 2)], question="Compare them.")
    assert ref.image_grid_thw.shape == (2, 3)
    diff = _compare_prefill(path, path, ref)
    assert diff < ATOL, f"{family}: max abs logit diff {diff}"


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_video_of_four_frames(tiny_checkpoint, family):
    path = tiny_checkpoint(family)
    frames = [_image(168, 112, seed) for seed in range(4)]
    ref = build_ref_inputs(path, video_frames=frames, question="What happens?")
    assert ref.video_grid_thw.tolist() == [[2, 8, 12]]
    diff = _compare_prefill(path, path, ref)
    assert diff < ATOL, f"{family}: max abs logit diff {diff}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", [{"layout": "flat"}, {"sharded": True}])
def test_prefill_other_checkpoint_layouts(tiny_checkpoint, family, variant):
    # Same seed, same weights: our model from the flat or sharded folder, transformers' from the plain one.
    ours, theirs = tiny_checkpoint(family, **variant), tiny_checkpoint(family)
    diff = _compare_prefill(ours, theirs, build_ref_inputs(theirs, [_image(300, 200)]))
    assert diff < ATOL, f"{family} {variant}: max abs logit diff {diff}"


def _our_greedy(model, cfg, ref, pos, steps: int) -> tuple[list[int], torch.Tensor]:
    """-> (tokens, logits[steps, V]) of a plain greedy loop over ContiguousKVCache."""
    cache = ContiguousKVCache(cfg.text.num_hidden_layers)
    hidden = model(ref.input_ids[0], pos, cache, _our_vision(model, ref), [])
    next_position = int(pos.max()) + 1
    logits = [model.compute_logits(hidden[-1:])]
    tokens = [int(logits[-1].argmax(-1))]
    for i in range(steps - 1):
        ids = torch.tensor([tokens[-1]])
        step_pos = torch.full((3, 1), next_position + i)  # decode step i: next_position + i on all rows
        hidden = model(ids, step_pos, cache, None, [])
        logits.append(model.compute_logits(hidden))
        tokens.append(int(logits[-1].argmax(-1)))
    return tokens, torch.cat(logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_32_tokens(tiny_checkpoint, family):
    path = tiny_checkpoint(family)
    ref = build_ref_inputs(path, [_image(300, 200)])
    hf = load_hf_model(path)
    with torch.inference_mode():
        # eos_token_id=[]: never stop early, so all 32 steps are compared.
        out = hf.generate(**ref.hf_kwargs(), max_new_tokens=32, do_sample=False, eos_token_id=[],
                          pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        expected = out.sequences[0, ref.input_ids.shape[1]:].tolist()
        model, cfg = load_model(path)
        got, logits = _our_greedy(model, cfg, ref, _hf_positions(hf, ref)[:, 0], 32)
    assert len(expected) == 32
    assert got == expected
    diff = (logits - torch.cat(out.logits)).abs().max().item()
    assert diff < ATOL, f"{family}: decode-step max abs logit diff {diff}"


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_smoke(tiny_checkpoint, family):
    path = tiny_checkpoint(family)
    diff = _compare_prefill(path, path, build_ref_inputs(path, [_image(300, 200)]), dtype=torch.bfloat16)
    assert diff < 0.15, f"{family}: bfloat16 max abs logit diff {diff}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, ATOL), (torch.bfloat16, 0.15)])
def test_cuda_prefill(tiny_checkpoint, family, dtype, tol):
    path = tiny_checkpoint(family)
    ref = build_ref_inputs(path, [_image(300, 200), _image(60, 490)])
    hf = load_hf_model(path)
    pos = _hf_positions(hf, ref)
    with torch.inference_mode():
        expected = hf(**ref.hf_kwargs(), position_ids=pos).logits[0]
        model, cfg = load_model(path, dtype=dtype, device="cuda")
        vision, _ = model.encode_vision(ref.pixel_values.cuda(), ref.image_grid_thw.cuda())
        hidden = model(ref.input_ids[0].cuda(), pos[:, 0].cuda(), ContiguousKVCache(cfg.text.num_hidden_layers),
                       vision, [])
        diff = (model.compute_logits(hidden).cpu() - expected).abs().max().item()
    assert diff < tol, f"{family} {dtype} on cuda: max abs logit diff {diff}"
