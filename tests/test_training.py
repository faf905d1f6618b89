"""Training: the compact data path equals the reference one, the stability guards, and short real runs
(from scratch, resume, LoRA) whose saved folders load in our loader and in transformers alike.

Everything uses tiny dims and 112 x 112 images, so a run takes seconds on one CPU core.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from qwenvl.models.registry import config_from_dir
from qwenvl.inputs import PreprocessorConfig
from qwenvl.checkpoints.loader import load_model
from qwenvl.models import build_model
from qwenvl.tokenizer import Tokenizer
from qwenvl.training.checkpoint import SmallModelDims, init_weights, write_new_checkpoint_dir
from qwenvl.training.packing import (DenseCausalAttention, Encoder, PackedCausalAttention, PixelUnpacker, pack,
                                     packed_loss)
from qwenvl.training.sft import TrainConfig, lr_at, train, train_step
from qwenvl.synthetic import COLORS, QUESTIONS, SHAPES, make_sample, messages
from qwenvl.training.tokenizer_train import default_chat_template, save_tokenizer, train_tokenizer

TINY = SmallModelDims(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vision_width=32, vision_depth=2, vision_heads=2,
                      min_pixels=56 * 56, max_pixels=112 * 112)


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory) -> Path:
    """A new tiny Qwen2-VL-architecture checkpoint folder (no weights) with a small trained tokenizer."""
    root = tmp_path_factory.mktemp("training")
    corpus = [QUESTIONS[("color", "en")].format(shape=s) for s in SHAPES] + list(COLORS) + \
        ["system\nYou are a helpful assistant.", "user\n", "assistant\n", "Describe this image."]
    save_tokenizer(train_tokenizer(corpus * 20, 300), root / "tokenizer", default_chat_template("qwen2_vl"))
    return write_new_checkpoint_dir(root / "init", root / "tokenizer", TINY)


def _config(init_dir: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model_dir=str(init_dir), out_dir=str(out), from_scratch=True, steps=60, batch_size=16, lr=3e-3,
                warmup=10, eval_every=30, eval_batches=2, save_every=0, tasks=["color"], autocast_bf16=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def scratch_run(init_dir, tmp_path_factory) -> dict:
    """A from-scratch run on the colour task (about ten seconds on one core)."""
    out = tmp_path_factory.mktemp("scratch")
    summary = train(_config(init_dir, out), log=lambda *_: None)
    return {"out": out, "summary": summary}


def _parts(model_dir):
    return config_from_dir(model_dir), Tokenizer.from_dir(model_dir), PreprocessorConfig.from_dir(model_dir)


def _noise_image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


# --- the compact data path --------------------------------------------------------------------------------

def test_compact_examples_equal_reference_bundled_config():
    """Bundled model's config (600 x 600 canvases, resizes of every kind): same ids, positions, mask, grid;
    unpacked pixels bit-identical to qwenvl.inputs' float32 pixel_values; 1/8 of the bytes."""
    d = Path(__file__).resolve().parent.parent / "qwenvl" / "assets" / "bundled"
    mc, tok, pc = _parts(d)
    compact, reference, unpack = Encoder(tok, mc, pc), Encoder(tok, mc, pc, compact=False), PixelUnpacker(pc)
    for i, task in enumerate(("count", "color", "ground", "read", "chart", "table")):
        msgs = messages(make_sample(3, i, task=task))
        a, b = compact(msgs), reference(msgs)
        for f in ("token_ids", "positions", "loss_mask", "grid_thw"):
            assert torch.equal(getattr(a, f), getattr(b, f)), (task, f)
        assert a.pixel_values.dtype == torch.uint8 and a.pixel_values.shape[2] == 1   # one frame per still
        assert torch.equal(unpack(a.pixel_values), b.pixel_values), task
        assert a.pixel_values.nbytes * 8 == b.pixel_values.nbytes


def test_compact_handles_two_images_custom_budget_and_mixes_with_video(init_dir):
    mc, tok, pc = _parts(init_dir)
    compact, reference, unpack = Encoder(tok, mc, pc), Encoder(tok, mc, pc, compact=False), PixelUnpacker(pc)
    two = [{"role": "user", "content": [
        {"type": "image", "image": _noise_image(90, 61, 1)},
        {"type": "image", "image": _noise_image(40, 130, 2), "max_pixels": 56 * 56},
        {"type": "text", "text": "Which is red?"}]},
        {"role": "assistant", "content": "red"}]
    video = [{"role": "user", "content": [{"type": "video", "video": [_noise_image(60, 60, s) for s in range(3)]},
                                          {"type": "text", "text": "What color?"}]},
             {"role": "assistant", "content": "blue"}]
    a, b = compact(two), reference(two)
    assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.positions, b.positions)
    assert torch.equal(unpack(a.pixel_values), b.pixel_values) and a.grid_thw.shape == (2, 3)
    v = compact(video)                          # videos take the reference path: float rows
    assert v.pixel_values.dtype == torch.float32
    with pytest.raises(ValueError, match="mixed"):
        pack([a, v])
    mixed, ref = pack([a, v], unpack), pack([b, reference(video)])
    assert torch.equal(mixed.pixel_values, ref.pixel_values) and torch.equal(mixed.token_ids, ref.token_ids)


def test_compact_batch_gives_the_same_loss_and_padded_attention_the_same_gradients(init_dir):
    mc, tok, pc = _parts(init_dir)
    torch.manual_seed(0)
    model = build_model(mc)
    init_weights(model)
    msgs = [messages(make_sample(0, i, task=t)) for i, t in enumerate(("color", "ground", "read", "count"))]
    compact = pack([Encoder(tok, mc, pc)(m) for m in msgs])
    reference = pack([Encoder(tok, mc, pc, compact=False)(m) for m in msgs])
    assert compact.nbytes < reference.nbytes / 4

    def loss_and_grads(batch, attention, unpack=None):
        model.zero_grad()
        loss, n = packed_loss(model, batch, unpack, attention=attention)
        loss.backward()
        return loss.item(), n, [p.grad.clone() for p in model.parameters()]

    ref_loss, ref_n, ref_grads = loss_and_grads(reference, DenseCausalAttention)
    loss, n, _ = loss_and_grads(compact, DenseCausalAttention, PixelUnpacker(pc))
    assert (loss, n) == (ref_loss, ref_n)              # identical pixels: identical loss, bit for bit
    loss, n, grads = loss_and_grads(compact, PackedCausalAttention, PixelUnpacker(pc))
    assert n == ref_n and abs(loss - ref_loss) < 1e-5
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unpack"):
        packed_loss(model, compact)


def test_padded_attention_equals_dense_mask_for_odd_segments():
    torch.manual_seed(0)
    seg = torch.tensor([0] + [1] * 5 + [2] * 3 + [3] * 7)     # a 1-token conversation too
    q, k, v = torch.randn(16, 4, 8), torch.randn(16, 2, 8), torch.randn(16, 2, 8)
    got = PackedCausalAttention(seg).attend(0, q, k, v)
    want = DenseCausalAttention(seg).attend(0, q, k, v)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


# --- stability ---------------------------------------------------------------------------------------------

def test_batch_without_targets_gives_zero_loss_not_nan(init_dir):
    mc, tok, pc = _parts(init_dir)
    model = build_model(mc)
    init_weights(model)
    batch = pack([Encoder(tok, mc, pc)(messages(make_sample(0, 0, task="color")))])
    batch.loss_mask[:] = False
    loss, n = packed_loss(model, batch, PixelUnpacker(pc))
    assert n == 0 and loss.item() == 0.0
    loss.backward()                                          # reaches the graph without NaN
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("bf16", [False, True])
def test_non_finite_step_is_skipped_and_training_goes_on(init_dir, bf16):
    mc, tok, pc = _parts(init_dir)
    torch.manual_seed(0)
    model = build_model(mc)
    init_weights(model)
    cfg = _config(init_dir, "", batch_size=2, autocast_bf16=bf16)
    good = pack([Encoder(tok, mc, pc, compact=False)(messages(make_sample(0, i, task="color"))) for i in range(2)])
    bad = pack([Encoder(tok, mc, pc, compact=False)(messages(make_sample(0, i, task="color"))) for i in range(2)])
    bad.pixel_values[0, 0] = float("nan")                     # a degenerate sample
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext
    before = [p.detach().clone() for p in params]
    r = train_step(model, opt, params, iter([bad]), cfg, PixelUnpacker(pc), autocast)
    assert r["skipped"] and math.isnan(r["loss"])
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    assert all(p.grad is None for p in params)
    r = train_step(model, opt, params, iter([good]), cfg, PixelUnpacker(pc), autocast)
    assert not r["skipped"] and math.isfinite(r["loss"]) and r["samples"] == 2
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    assert all(torch.isfinite(p).all() for p in params)


# --- real runs ---------------------------------------------------------------------------------------------

def test_run_from_scratch_loss_falls_and_checkpoint_reloads(scratch_run, init_dir):
    s = scratch_run["summary"]
    first_loss = s["history"][0]["loss"]                     # ~ ln(vocab) before any learning
    evals = [h["eval_loss"] for h in s["history"] if "eval_loss" in h]
    assert s["steps"] == 60 and s["skipped_steps"] == 0 and len(evals) == 2
    assert evals[-1] < 0.4 * first_loss, (first_loss, evals)
    assert evals[-1] < evals[0]
    final = Path(s["final_dir"])
    model, cfg = load_model(final, dtype=torch.float32)
    mc, tok, pc = _parts(final)
    heldout = pack([Encoder(tok, mc, pc)(messages(make_sample(1, i, task="color", split="heldout")))
                    for i in range(16)])
    with torch.no_grad():
        loss, _ = packed_loss(model, heldout, PixelUnpacker(pc))
    assert loss.item() < 0.5 * first_loss                     # the saved weights are the trained ones
    from qwenvl import LLM, SamplingParams
    out = LLM(str(final)).generate([messages(make_sample(1, 0, task="color", split="heldout"))[:1]],
                                   SamplingParams(temperature=0.0, max_tokens=4))
    assert isinstance(out[0].text, str)


def test_resume_continues_the_step_count(init_dir, tmp_path):
    logs: list[str] = []
    first = train(_config(init_dir, tmp_path, steps=4, save_every=2, eval_every=0, batch_size=4), log=logs.append)
    assert first["steps"] == 4 and (tmp_path / "train_state.pt").exists()
    state = torch.load(tmp_path / "train_state.pt", weights_only=False)
    assert state["step"] == 4
    second = train(_config(init_dir, tmp_path, steps=7, save_every=2, eval_every=0, batch_size=4), log=logs.append)
    assert any(re.search(r"resumed from .* at step 4", m) for m in logs)
    assert second["steps"] == 7
    assert [h["step"] for h in second["history"]] == list(range(1, 8))
    assert torch.load(tmp_path / "train_state.pt", weights_only=False)["step"] == 7
    summary = (tmp_path / "summary.json").read_text()
    weights = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "final").iterdir()}
    again = train(_config(init_dir, tmp_path, steps=7, save_every=2, eval_every=0, batch_size=4), log=logs.append)
    assert re.search(r"has finished: step 7 of 7, its model is in .*final\. Nothing to train", logs[-1])
    assert again["already_finished"] and again["steps"] == 7 and again["tokens"] == second["tokens"] > 0
    assert (tmp_path / "summary.json").read_text() == summary             # the finished run's record is kept
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "final").iterdir()} == weights


def test_cpu_run_with_data_workers_leaves_them_their_cores(init_dir, tmp_path):
    """With data workers on a CPU, the compute pool gets the cores they leave (not all of them, which made
    a step 6x slower on 2 cores), and the caller's thread count comes back afterwards."""
    import os
    before = torch.get_num_threads()
    seen: list[int] = []
    train(_config(init_dir, tmp_path, steps=2, eval_every=1, batch_size=2, workers=1),
          log=lambda *_: seen.append(torch.get_num_threads()))
    assert seen and set(seen) == {max(1, (os.cpu_count() or 1) - 1)}
    assert torch.get_num_threads() == before


class _FakeClock:
    """time.time() for sft: every reading is half a second after the last, so wall time is a step count."""

    def __init__(self):
        self.now = 0.0

    def time(self) -> float:
        self.now += 0.5
        return self.now


def test_a_run_split_into_sittings_keeps_one_fitted_schedule(init_dir, tmp_path, monkeypatch):
    from qwenvl.training import sft
    monkeypatch.setattr(sft, "CALIBRATION_STEPS", 6)
    logs: list[str] = []

    def sitting():
        monkeypatch.setattr(sft, "time", _FakeClock())
        return train(_config(init_dir, tmp_path, steps=1000, eval_every=0, batch_size=2, warmup=2,
                             max_minutes=1.0, sitting_minutes=0.25), log=logs.append)

    first = sitting()
    fitted = int(re.search(r"fit (\d+) steps", " ".join(logs)).group(1))
    assert first["steps"] < fitted < 1000                  # stopped by the sitting, not by the schedule
    assert (tmp_path / "final" / "config.json").exists()  # each sitting leaves a usable checkpoint
    second = sitting()
    assert any(f"at step {first['steps']} of {fitted}" in m for m in logs)
    assert not any("fit" in m for m in logs[logs.index(next(m for m in logs if "resumed" in m)):])
    resumed = [h for h in second["history"] if h["step"] > first["steps"]]
    expected = replace(_config(init_dir, tmp_path, warmup=2), steps=fitted)
    assert resumed and [h["lr"] for h in resumed] == [lr_at(h["step"] - 1, expected) for h in resumed]
    assert second["steps"] > first["steps"]


def test_lora_run_merges_and_saves_a_plain_checkpoint(scratch_run, tmp_path):
    base_dir = Path(scratch_run["summary"]["final_dir"])
    summary = train(_config(base_dir, tmp_path, from_scratch=False, lora_rank=4, steps=6, eval_every=0,
                            batch_size=4, lr=1e-2, warmup=1), log=lambda *_: None)
    merged, _ = load_model(summary["final_dir"], dtype=torch.float32)     # strict: no lora_* keys, none missing
    base, _ = load_model(base_dir, dtype=torch.float32)
    m, b = merged.state_dict(), base.state_dict()
    assert m.keys() == b.keys() and not any("lora" in k for k in m)
    changed = {k for k in m if not torch.equal(m[k], b[k])}
    assert changed and all(k.startswith("model.language_model.layers.") and k.endswith("proj.weight") for k in changed)
    assert (Path(summary["final_dir"]) / "model.safetensors").exists()


def _assert_transformers_gives_our_logits(folder: Path) -> None:
    """Our LLM(dir) and transformers' Qwen2VLForConditionalGeneration read the same folder; prefill logits
    with one image agree in float32."""
    pytest.importorskip("transformers")
    from hf_reference import build_ref_inputs
    from transformers import Qwen2VLForConditionalGeneration

    from qwenvl import LLM
    from qwenvl.layers.attention import ContiguousKVCache
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["Qwen2VLForConditionalGeneration"]
    LLM(str(folder))                                            # the public entry point loads it
    ref = build_ref_inputs(folder, [_noise_image(100, 70, 0)], question="What color is the circle?")
    hf = Qwen2VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                         attn_implementation="eager").eval()
    pos, _ = hf.model.get_rope_index(ref.input_ids, mm_token_type_ids=ref.mm_token_type_ids,
                                     image_grid_thw=ref.image_grid_thw)
    model, cfg = load_model(folder, dtype=torch.float32)
    with torch.inference_mode():
        expected = hf(**ref.hf_kwargs(), position_ids=pos).logits[0]
        vision, _ = model.encode_vision(ref.pixel_values, ref.image_grid_thw)
        hidden = model(ref.input_ids[0], pos[:, 0], ContiguousKVCache(cfg.text.num_hidden_layers), vision, [])
        got = model.compute_logits(hidden)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4


def test_saved_folder_loads_in_transformers_with_the_same_logits(scratch_run):
    _assert_transformers_gives_our_logits(Path(scratch_run["summary"]["final_dir"]))


def test_resplit_mrope_sections_mean_the_same_in_transformers(scratch_run, tmp_path):
    """The bundled model gives height and width more of the rotary pairs than the default split (one for
    time): the same weights under such a split give the same logits in transformers as in our loader."""
    import shutil
    folder = Path(shutil.copytree(scratch_run["summary"]["final_dir"], tmp_path / "resplit"))
    config = json.loads((folder / "config.json").read_text())
    assert sum(config["rope_scaling"]["mrope_section"]) == 8        # TINY's head_dim 16
    config["rope_scaling"]["mrope_section"] = [1, 2, 5]
    (folder / "config.json").write_text(json.dumps(config))
    assert config_from_dir(folder).text.mrope_section == (1, 2, 5)
    _assert_transformers_gives_our_logits(folder)


def test_followup_turns_are_learned_from_and_share_one_image(init_dir):
    from qwenvl.training.sft import SyntheticConversations
    mc, tok, pc = _parts(init_dir)
    encoder = Encoder(tok, mc, pc)
    single = SyntheticConversations(encoder, 0, "train", ["chart"])
    several = SyntheticConversations(encoder, 0, "train", ["chart"], followups=4)
    im_end = tok.token_to_id("<|im_end|>")
    turns = []
    for i in range(6):
        a, b = single[i], several[i]
        assert torch.equal(a.grid_thw, b.grid_thw) and torch.equal(a.pixel_values, b.pixel_values)   # one image
        assert torch.equal(b.token_ids[:len(a.token_ids)], a.token_ids)    # the first turn is the single one
        n = int((b.token_ids[b.loss_mask] == im_end).sum())               # one learned <|im_end|> per answer
        assert int((b.token_ids == mc.image_token_id).sum()) == int((a.token_ids == mc.image_token_id).sum())
        turns.append(n)
    assert min(turns) >= 1 and max(turns) > 1


def test_vision_probe_run_keeps_its_heads_out_of_the_checkpoint(init_dir, tmp_path):
    from qwenvl.training.patch_labels import LABEL_COLUMNS
    from qwenvl.training.sft import SyntheticConversations
    mc, tok, pc = _parts(init_dir)
    data = SyntheticConversations(Encoder(tok, mc, pc), 0, "train", ["color", "read"], vision_labels=True)
    shapes, text = data[0], data[1]
    assert shapes.vision_labels.shape == (int(shapes.grid_thw.prod()) // 4, LABEL_COLUMNS)
    assert (shapes.vision_labels[:, 0] > 0).any()               # some token shows the shape
    assert (text.vision_labels[:, :7] == -1).all()              # a reading image has no shape labels ...
    assert (text.vision_labels[:, 7:] > 0).any()                # ... but its characters (test_train_read.py)
    s = train(_config(init_dir, tmp_path, steps=3, eval_every=0, batch_size=4, vision_probe=1.0),
              log=lambda *_: None)
    state = torch.load(tmp_path / "train_state.pt", weights_only=False)
    heads = ("colour", "kind", "edges", "count", "place", "box", "chars")
    assert set(state["probe"]) == {f"{h}.{p}" for h in heads for p in ("weight", "bias")}
    model, _ = load_model(s["final_dir"], dtype=torch.float32)   # strict: no probe keys in the folder
    assert not any("colour" in k for k in model.state_dict())


# --- JSONL data (issue 29 item 16) ----------------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _encoder(model_dir) -> Encoder:
    mc, tok, pc = _parts(model_dir)
    return Encoder(tok, mc, pc)


def test_example_jsonl_reads_and_image_url_parts_resolve_like_image_parts(init_dir, tmp_path):
    """examples/train.jsonl (the README's format) encodes every row; an OpenAI image_url part with a path
    relative to the JSONL file gives the same example as an {"image": ...} part."""
    from qwenvl.training.sft import JsonlConversations
    data = JsonlConversations(_encoder(init_dir), str(EXAMPLES / "train.jsonl"))
    assert len(data) == 4 and all(data[i].grid_thw.shape[0] == 1 for i in range(len(data)))
    (tmp_path / "img").mkdir()
    Image.open(EXAMPLES / "shapes.png").save(tmp_path / "img" / "s.png")
    question = {"type": "text", "text": "What colour is the circle?"}
    rows = [{"messages": [{"role": "user", "content": [part, question]}, {"role": "assistant", "content": "red"}]}
            for part in ({"type": "image", "image": "img/s.png"},
                         {"type": "image_url", "image_url": {"url": "img/s.png"}},
                         {"image_url": {"url": "img/s.png"}})]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    a, b, c = (JsonlConversations(_encoder(init_dir), str(path))[i] for i in range(3))
    for other in (b, c):
        assert torch.equal(a.token_ids, other.token_ids) and torch.equal(a.pixel_values, other.pixel_values)


def test_a_missing_image_names_the_file_and_the_jsonl_line(init_dir, tmp_path):
    from qwenvl.training.sft import JsonlConversations
    good = (EXAMPLES / "train.jsonl").read_text(encoding="utf-8").splitlines()[0]
    bad = good.replace("shapes.png", "shapse.png")
    (tmp_path / "shapes.png").write_bytes((EXAMPLES / "shapes.png").read_bytes())
    for broken in (bad, bad.replace('{"type": "image", "image": "shapse.png"}',
                                    '{"type": "image_url", "image_url": {"url": "shapse.png"}}')):
        path = tmp_path / "d.jsonl"
        path.write_text(f"{good}\n\n{broken}\n", encoding="utf-8")
        with pytest.raises(FileNotFoundError, match=r"line 3: no such file 'shapse.png'"):
            JsonlConversations(_encoder(init_dir), str(path))
    path.write_text(f"{good}\n{good[:-3]}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: not JSON"):
        JsonlConversations(_encoder(init_dir), str(path))


def test_jsonl_eval_loss_is_held_out_or_named_a_training_loss(init_dir, tmp_path):
    """A JSONL file with enough rows keeps every 20th out of training for the evaluation loss; a tiny one
    says its evaluation loss is measured on training rows instead of calling it held-out."""
    from qwenvl.training.sft import make_datasets
    rows = (EXAMPLES / "train.jsonl").read_text(encoding="utf-8").splitlines()
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(rows * 10) + "\n", encoding="utf-8")
    (tmp_path / "shapes.png").write_bytes((EXAMPLES / "shapes.png").read_bytes())
    for name in ("word.png", "chart.png"):
        (tmp_path / name).write_bytes((EXAMPLES / name).read_bytes())
    train_set, eval_set = make_datasets(_config(init_dir, tmp_path / "o", data=str(path)), _encoder(init_dir))
    train_lines = {n for n, _ in train_set.rows}
    eval_lines = {n for n, _ in eval_set.rows}
    assert len(eval_lines) == 2 and len(train_lines) == 38 and not train_lines & eval_lines
    logs = []
    train(_config(init_dir, tmp_path / "run", data=str(EXAMPLES / "train.jsonl"), steps=2, batch_size=2,
                  eval_every=2, eval_batches=1), log=logs.append)
    assert any("loss on training rows" in line for line in logs) and not any("held-out" in line for line in logs)


@pytest.mark.parametrize("workers", [0, 1])
def test_ctrl_c_during_training_saves_the_state_and_exits_cleanly(init_dir, tmp_path, workers):
    """SIGINT to the process group (what a terminal's Ctrl-C sends, data workers included) after the first
    logged step: train_state.pt is written, exit code 130, no traceback."""
    import os
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "qwenvl", "train", "--model", str(init_dir), "--out", str(out), "--from-scratch",
           "--data", str(EXAMPLES / "train.jsonl"), "--steps", "100000", "--batch-size", "2", "--eval-every", "1",
           "--save-every", "0", "--warmup", "1", "--workers", str(workers)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=Path(__file__).resolve().parent.parent, start_new_session=True)
    lines = []
    deadline = time.time() + 60
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("step 1:"):
            os.killpg(proc.pid, signal.SIGINT)
            break
    try:
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert any(l.startswith("step 1:") for l in lines), (lines, err)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Traceback" not in rest, err
    assert "saved" in rest and (out / "train_state.pt").exists()
    state = torch.load(out / "train_state.pt", map_location="cpu", weights_only=False)
    assert state["step"] >= 1
