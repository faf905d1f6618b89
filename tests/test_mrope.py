"""M-RoPE positions vs transformers' get_rope_index (images, all families) and vs the original rule (video)."""

import types

import pytest
import torch

from qwenvl.inputs.mrope import VisionSpan, mrope_positions, video_time_interval

IMG, VID = 7, 8     # stand-in pad ids: get_rope_index only reads mm_token_type_ids


def _hf_rope_index(family: str, ids, mm_types, image_grids=None, video_grids=None, tokens_per_second=2,
                   second_per_grid_ts=None):
    """Call the transformers method unbound, on a stand-in `self` holding only what it reads."""
    import transformers
    if family == "qwen2_vl":
        cls, cfg = transformers.Qwen2VLModel, transformers.Qwen2VLConfig()
    elif family == "qwen2_5_vl":
        cls, cfg = transformers.Qwen2_5_VLModel, transformers.Qwen2_5_VLConfig()
        cfg.vision_config.tokens_per_second = tokens_per_second
    else:
        cls, cfg = transformers.Qwen3VLModel, transformers.Qwen3VLConfig()
    fake = types.SimpleNamespace(config=cfg)
    fake.get_vision_position_ids = lambda *a, **k: cls.get_vision_position_ids(fake, *a, **k)
    kw = {"second_per_grid_ts": second_per_grid_ts} if family == "qwen2_5_vl" else {}
    pos, _ = cls.get_rope_index(
        fake, torch.tensor([ids]), torch.tensor([mm_types]),
        image_grid_thw=torch.tensor(image_grids) if image_grids else None,
        video_grid_thw=torch.tensor(video_grids) if video_grids else None, **kw)
    return pos[:, 0]


def _layout(pieces):
    """pieces: ints (text runs) and (kind, grid) vision spans -> ids, mm types, our spans."""
    ids, types_, spans = [], [], []
    for p in pieces:
        if isinstance(p, int):
            ids += [1] * p
            types_ += [0] * p
        else:
            kind, grid, interval = (*p, 1.0) if len(p) == 2 else p
            n = grid[0] * grid[1] * grid[2] // 4
            spans.append(VisionSpan(len(ids), tuple(grid), interval))
            ids += [IMG if kind == "image" else VID] * n
            types_ += [1 if kind == "image" else 2] * n
    return ids, types_, spans


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_images_match_transformers(family):
    grids = [(1, 4, 6), (1, 8, 2), (1, 2, 2)]
    ids, mm, spans = _layout([5, ("image", grids[0]), 3, ("image", grids[1]), 2, ("image", grids[2]), 4])
    ours, nxt = mrope_positions(len(ids), spans, merge_size=2)
    ref = _hf_rope_index(family, ids, mm, image_grids=grids)
    assert torch.equal(ours, ref)
    assert nxt == int(ref.max()) + 1


def test_qwen3_video_frames_match_transformers():
    # Qwen3-VL: one span per temporal patch (t == 1), timestamps as text between them.
    grid = (3, 4, 4)
    pieces = [4]
    for _ in range(grid[0]):
        pieces += [3, ("video", (1, 4, 4)), 1]
    ids, mm, spans = _layout(pieces + [2])
    ours, nxt = mrope_positions(len(ids), spans, merge_size=2)
    ref = _hf_rope_index("qwen3_vl", ids, mm, video_grids=[grid])
    assert torch.equal(ours, ref) and nxt == int(ref.max()) + 1


def test_video_follows_original_max_plus_one_rule():
    # transformers 5.x resumes text at start + max(h, w) / merge after a span; the original Qwen2/2.5-VL code
    # (and this implementation) resume at max(previous positions) + 1. They differ when the temporal extent
    # is the longest, as here: 6 temporal patches over a 2x2 merged grid.
    grid = (6, 4, 4)
    ids, mm, spans = _layout([3, ("video", grid), 2])
    ours, nxt = mrope_positions(len(ids), spans, merge_size=2)
    t_rows = torch.arange(6).repeat_interleave(4) + 3
    assert torch.equal(ours[0, 3:27], t_rows)
    assert torch.equal(ours[1, 3:27], torch.tensor([0, 0, 1, 1] * 6) + 3)
    assert torch.equal(ours[2, 3:27], torch.tensor([0, 1, 0, 1] * 6) + 3)
    assert ours[:, 27].tolist() == [9, 9, 9]            # max (3 + 5) + 1
    assert nxt == 11
    ref = _hf_rope_index("qwen2_vl", ids, mm, video_grids=[grid])
    assert torch.equal(ours[:, :27], ref[:, :27])       # the span itself agrees
    assert ref[0, 27].item() == 5                       # transformers 5.x: 3 + max(2, 2); we keep 9


def test_qwen2_5_video_time_interval():
    interval = video_time_interval(True, tokens_per_second=2, temporal_patch_size=2, fps=2.0)   # Qwen2.5-VL
    assert interval == 2.0
    assert video_time_interval(False, 2, 2, 2.0) == 1.0                                          # Qwen2-VL
    grid = (3, 4, 6)
    ids, mm, spans = _layout([2, ("video", grid, interval), 3])
    ours, nxt = mrope_positions(len(ids), spans, merge_size=2)
    assert ours[0, 2:20].tolist() == [2] * 6 + [4] * 6 + [6] * 6
    # text after: max(t=6, h=2+1, w=2+2) + 1 = 7
    assert ours[:, 20].tolist() == [7, 7, 7] and nxt == 10
    # transformers agrees on the span itself (same float32 multiply then truncate)
    ref = _hf_rope_index("qwen2_5_vl", ids, mm, video_grids=[grid], tokens_per_second=2,
                         second_per_grid_ts=[1.0])
    assert torch.equal(ours[:, :20], ref[:, :20])


def test_text_only_and_bad_spans():
    pos, nxt = mrope_positions(5, [], 2)
    assert pos.tolist() == [list(range(5))] * 3 and nxt == 5
    with pytest.raises(ValueError, match="span"):
        mrope_positions(5, [VisionSpan(2, (1, 4, 4))], 2)
