"""The pieces of the reading run (issue 41): character labels on reading scenes, the depth growth that keeps
a model's answers, the model snapshots a time-limited machine brings back, and data echoing."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import torch

from qwenvl.inputs import PreprocessorConfig
from qwenvl.inputs.preprocess import smart_resize
from qwenvl.synthetic import make_sample
from qwenvl.training.echo import EchoingBatches
from qwenvl.training.patch_labels import (BACKGROUND, CHAR_POINTS, IGNORE, LABEL_COLUMNS, SHAPE_COLUMNS,
                                          VisionProbe, char_class, sample_labels)
from qwenvl.training.snapshots import MODEL_TAR, read_model_tar, write_model_tar

BUNDLED = "qwenvl/assets/bundled"


def _labels_of(sample, pre):
    W, H = sample.image.size
    h, w = smart_resize(H, W, factor=28, min_pixels=pre.min_pixels, max_pixels=pre.max_pixels)
    labels = sample_labels(sample, torch.tensor([[1, h // 14, w // 14]]), pre)
    return labels, h // 28, w // 28


def test_reading_scene_labels_its_characters_in_order_on_the_text_rows_only():
    pre = PreprocessorConfig.from_dir(BUNDLED)
    exact = 0
    for i in range(20):
        sample = make_sample(0, i, task="read")
        labels, rows, cols = _labels_of(sample, pre)
        assert labels.shape == (rows * cols, LABEL_COLUMNS)
        assert (labels[:, :SHAPE_COLUMNS] == IGNORE).all()                 # no shape labels on a reading scene
        chars = labels[:, SHAPE_COLUMNS:].reshape(rows, cols * CHAR_POINTS)
        on_rows = [r for r in range(rows) if (chars[r] != BACKGROUND).any()]
        assert 1 <= len(on_rows) <= 3                                       # the text's rows, nothing above or below
        top = sample.meta["text_box"][1] * rows * 28 / sample.image.size[1]
        assert abs(on_rows[0] * 28 - top) < 28
        # left to right, each character where the pen drew it (runs of one character collapsed)
        seen = [k for k, _ in itertools.groupby(chars[on_rows[0]].tolist()) if k != BACKGROUND]
        want = [k for k, _ in itertools.groupby(char_class(c) for c in sample.answer)]
        it = iter(want)
        assert all(k in it for k in seen), (sample.answer, seen)           # never a character out of order
        exact += seen == want
    assert exact >= 18          # two narrow letters side by side (the "fl" of "flamethrower") can share a point


def test_shape_scenes_carry_no_character_labels_and_the_char_head_trains_on_reading_tokens_only():
    pre = PreprocessorConfig.from_dir(BUNDLED)
    shape_labels, _, _ = _labels_of(make_sample(0, 1, task="count"), pre)
    read_labels, _, _ = _labels_of(make_sample(0, 0, task="read"), pre)
    assert (shape_labels[:, SHAPE_COLUMNS:] == IGNORE).all()
    labels = torch.cat([shape_labels, read_labels])
    probe = VisionProbe(16)
    vision = torch.randn(len(labels), 16, requires_grad=True)
    loss = probe.loss(vision, labels)
    loss.backward()
    assert probe.chars.weight.grad.abs().sum() > 0 and probe.colour.weight.grad.abs().sum() > 0
    # the char head's loss alone: no gradient reaches shape-scene tokens through it
    probe.zero_grad()
    vision.grad = None
    (probe.loss(vision, labels) - probe.shape_loss(vision, labels)).backward()
    assert vision.grad[:len(shape_labels)].abs().sum() == 0
    assert vision.grad[len(shape_labels):].abs().sum() > 0
    # a head that already knows the characters has a lower loss than a random one
    x = vision.detach()
    with torch.no_grad():
        before = float(probe.loss(x, labels) - probe.shape_loss(x, labels))
    opt = torch.optim.Adam(probe.chars.parameters(), lr=0.05)
    for _ in range(50):
        opt.zero_grad()
        (probe.loss(x, labels) - probe.shape_loss(x, labels)).backward()
        opt.step()
    with torch.no_grad():
        assert float(probe.loss(x, labels) - probe.shape_loss(x, labels)) < 0.5 * before


def test_grown_model_answers_exactly_as_the_original(tmp_path):
    from qwenvl.models.registry import config_from_dir
    from qwenvl.checkpoints.loader import load_model
    from qwenvl.synthetic import messages
    from qwenvl.tokenizer import Tokenizer
    from qwenvl.training.grow import grow_depth
    from qwenvl.training.packing import Encoder, PixelUnpacker, pack, packed_loss
    grown = grow_depth(BUNDLED, tmp_path / "grown", vision_depth=6, text_layers=5)
    cfg = config_from_dir(grown)
    assert cfg.vision.depth == 6 and cfg.text.num_hidden_layers == 5
    pre = PreprocessorConfig.from_dir(BUNDLED)
    encoder = Encoder(Tokenizer.from_dir(BUNDLED), config_from_dir(BUNDLED), pre)
    batch = pack([encoder(messages(make_sample(3, i, task=t))) for i, t in enumerate(("read", "count", "ground"))],
                 PixelUnpacker(pre))
    losses = []
    for folder in (BUNDLED, grown):
        model, _ = load_model(str(folder), dtype=torch.float32, device="cpu")
        with torch.no_grad():
            losses.append(float(packed_loss(model, batch, PixelUnpacker(pre))[0]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="only adds"):
        grow_depth(BUNDLED, tmp_path / "smaller", vision_depth=2)


def test_model_tar_round_trips_whole_or_in_parts_and_leaves_no_stale_files(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 400)       # 100 KB
    out = tmp_path / "out"
    parts = write_model_tar(folder, out, part_bytes=40_000)
    assert [p.name for p in parts] == [f"{MODEL_TAR}.{i:02d}" for i in range(len(parts))] and len(parts) >= 3
    assert all(p.stat().st_size <= 40_000 for p in parts)
    back = read_model_tar(out, tmp_path / "back1")
    assert (back / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    whole = write_model_tar(folder, out)                                      # now small enough for one file
    assert [p.name for p in whole] == [MODEL_TAR]
    assert sorted(p.name for p in out.iterdir()) == [MODEL_TAR]               # the parts and temporaries are gone
    back = read_model_tar(out, tmp_path / "back2")
    assert (back / "config.json").read_text() == '{"a": 1}'
    with pytest.raises(FileNotFoundError, match="model.tar"):
        read_model_tar(tmp_path / "ckpt", tmp_path / "nothing")


def test_echo_repeats_a_batch_only_while_the_next_is_not_ready():
    release = threading.Event()

    def source():
        yield "a"
        release.wait(10)
        yield "b"
        yield "c"

    batches = EchoingBatches(source(), times=3)
    assert [next(batches) for _ in range(3)] == ["a", "a", "a"] and batches.echoed == 2
    got = []
    waiter = threading.Thread(target=lambda: got.append(next(batches)))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()                     # three uses of "a" spent: it waits for a new batch
    release.set()
    waiter.join(10)
    assert got == ["b"]
    deadline = time.time() + 10
    while batches._ready.empty() and time.time() < deadline:    # "c" arrives: no repeat of "b" while it is there
        time.sleep(0.01)
    assert next(batches) == "c" and batches.echoed == 2


def test_echo_raises_the_sources_error():
    def source():
        yield 1
        raise ValueError("worker broke")

    batches = EchoingBatches(source(), times=1)
    assert next(batches) == 1
    with pytest.raises(ValueError, match="worker broke"):
        next(batches)
