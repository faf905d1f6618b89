"""Video files: frames picked and sized exactly as qwen-vl-utils' fetch_video does; bad videos are InputErrors."""

from __future__ import annotations

import base64
import itertools

import numpy as np
import pytest

import qwen_vl_utils_oracle
from qwenvl.inputs import InputError, normalize_messages
from qwenvl.inputs import video as video_mod
from qwenvl.inputs.video import VideoOptions, count_frames, frame_range, frame_size, read_video, resize_frame
from video_files import decode_all, write_video

VP = qwen_vl_utils_oracle.load()
needs_oracle = pytest.mark.skipif(VP is None, reason="qwen-vl-utils is not installed (pip install qwen-vl-utils)")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    return {
        "2s10": write_video(d / "a.mp4", seconds=2, fps=10),                       # 20 frames
        "3s10": write_video(d / "b.mkv", seconds=3, fps=10, codec="libx264"),     # no frame count in the header
        "1.5s24": write_video(d / "c.mp4", seconds=1.5, fps=24, width=48, height=64),
        "3.3s30": write_video(d / "d.webm", seconds=3.3, fps=30, width=96, height=32, codec="libvpx"),
        "0.4s10": write_video(d / "e.mp4", seconds=0.4, fps=10),                  # 4 frames
    }


# ------------------------------------------------------------------------------------------ hand-computed


def test_default_sampling_of_two_seconds(clips):
    v = read_video(clips["2s10"])
    # 20 frames at 10 fps, fps 2 -> 4 frames at linspace(0, 19, 4) = 0, 6.33, 12.67, 19
    assert v.frame_indices == [0, 6, 13, 19]
    assert v.sample_fps == pytest.approx(2.0) and v.video_fps == 10.0
    # 64x48 is below 128 tokens of 28x28: scaled up to 100352 pixels -> 392 x 280
    assert v.size == (392, 280) and v.original_size == (64, 48)
    full = decode_all(clips["2s10"])
    for frame, i in zip(v.frames, v.frame_indices):
        assert frame.shape == (280, 392, 3) and frame.dtype == np.uint8
        np.testing.assert_array_equal(frame, resize_frame(full[i], 280, 392))


def test_nframes_range_and_pixels_by_hand(clips):
    # nframes 5 rounds (half to even, as Python's round) to 4: linspace(0, 29, 4) = 0, 9.67, 19.33, 29
    assert read_video(clips["3s10"], VideoOptions(nframes=5)).frame_indices == [0, 10, 19, 29]
    # video_start 0.5 s, video_end 1.5 s at 10 fps: frames 5..15 (11), fps 2 -> 2.2 -> at least 4
    v = read_video(clips["3s10"], VideoOptions(video_start=0.5, video_end=1.5, min_pixels=3136, max_pixels=3136))
    assert v.frame_indices == [5, 8, 12, 15]
    assert v.sample_fps == pytest.approx(4 / 11 * 10)
    assert v.size == (56, 56)                 # 64x48 rounds to 56x56 = 3136 pixels, inside the bounds
    # Qwen3-VL's patch 16: factor 32
    assert read_video(clips["2s10"], VideoOptions(min_pixels=1024), patch_size=16).size == (64, 64)


def test_sources_path_file_url_data_url_bytes(clips):
    path = clips["2s10"]
    data = path.read_bytes()
    want = read_video(path)
    for src in (str(path), f"file://{path}", "data:video/mp4;base64," + base64.b64encode(data).decode(), data):
        got = read_video(src)
        assert got.frame_indices == want.frame_indices and got.size == want.size
        assert all((a == b).all() for a, b in zip(got.frames, want.frames))


def test_message_shapes():
    conv = normalize_messages([{"role": "user", "content": [
        {"type": "video", "video": "clip.mp4", "fps": 1, "max_frames": 8},
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA", "nframes": 6}},
        {"video": ["a.png", "b.png"]}, {"text": "what happens?"}]}])
    parts = conv[0]["content"]
    assert parts[0] == {"type": "video", "video": "clip.mp4", "fps": 1.0, "max_frames": 8}
    assert parts[1] == {"type": "video", "video": "data:video/mp4;base64,AAAA", "nframes": 6}
    assert parts[2] == {"type": "video", "video": ["a.png", "b.png"]}


# ------------------------------------------------------------------------------------------ the oracle

OPTIONS = [{}, {"fps": 1.0}, {"fps": 4.0}, {"fps": 30.0}, {"nframes": 4}, {"nframes": 7}, {"min_frames": 10},
           {"max_frames": 5}, {"fps": 0.5, "min_frames": 2}, {"video_start": 0.5, "video_end": 1.2},
           {"video_start": 1.0}, {"video_end": 0.9, "fps": 8.0}, {"min_pixels": 3136}, {"max_pixels": 120000},
           {"total_pixels": 300000}, {"min_pixels": 2000, "max_pixels": 5000}, {"total_pixels": 20000}]


@needs_oracle
@pytest.mark.parametrize("clip", ["2s10", "3s10", "1.5s24", "3.3s30"])
@pytest.mark.parametrize("patch", [14, 16])
def test_file_matches_qwen_vl_utils_fetch_video(clips, clip, patch):
    path = str(clips[clip])
    for opts in OPTIONS:
        try:
            frames, indices, sample_fps = qwen_vl_utils_oracle.fetch_video(VP, {"video": path, **opts}, patch)
        except (ValueError, AssertionError):          # e.g. a max_pixels under the default min_pixels
            with pytest.raises(InputError):
                read_video(path, VideoOptions(**opts), patch_size=patch)
            continue
        got = read_video(path, VideoOptions(**opts), patch_size=patch)
        assert got.frame_indices == indices, opts
        assert got.sample_fps == pytest.approx(sample_fps), opts
        assert got.size == (frames.shape[2], frames.shape[1]), opts
        assert all((a == b).all() for a, b in zip(got.frames, frames)), opts


@needs_oracle
def test_rules_match_qwen_vl_utils_on_a_grid():
    """frame_range / count_frames / frame_size against smart_nframes, calculate_video_frame_range and
    smart_resize over many (frame count, fps, size, option) combinations, errors included."""
    checked = 0
    for total, fps, opts in itertools.product(
            [1, 2, 3, 5, 8, 20, 61, 300, 2000], [1.0, 7.5, 23.976, 30.0, 60.0],
            [{}, {"fps": 0.25}, {"fps": 5.0}, {"nframes": 2}, {"nframes": 9}, {"nframes": 64}, {"min_frames": 16},
             {"max_frames": 7}, {"min_frames": 3, "max_frames": 1000}, {"video_start": 0.3, "video_end": 2.0},
             {"video_end": 0.05}]):
        ele = dict(opts)
        try:
            first, last, n_range = VP.calculate_video_frame_range(ele, total, fps)
            want = (first, last, VP.smart_nframes(ele, total_frames=n_range, video_fps=fps))
        except (ValueError, AssertionError):
            want = None
        o = VideoOptions(**opts)
        if want is None:
            with pytest.raises(InputError):
                first, last = frame_range(total, fps, o)
                count_frames(last - first + 1, fps, o)
        else:
            first, last = frame_range(total, fps, o)
            assert (first, last, count_frames(last - first + 1, fps, o)) == want, (total, fps, opts)
        checked += 1
    for (h, w), n, factor, opts in itertools.product(
            [(48, 64), (480, 640), (1080, 1920), (20, 700), (700, 20), (13, 90), (2000, 30)], [2, 4, 16, 768],
            [28, 32], [{}, {"min_pixels": 1000}, {"max_pixels": 50000}, {"total_pixels": 100000},
                       {"min_pixels": 4000, "max_pixels": 4100}, {"max_pixels": 800}]):
        vmin = opts.get("min_pixels", VP.VIDEO_MIN_TOKEN_NUM * factor * factor)
        total = opts.get("total_pixels", VP.MODEL_SEQ_LEN * factor * factor * 0.9)
        vmax = max(min(VP.VIDEO_MAX_TOKEN_NUM * factor * factor, total / n * VP.FRAME_FACTOR), int(vmin * 1.05))
        vmax = min(opts.get("max_pixels", vmax), vmax)
        try:
            want = VP.smart_resize(h, w, factor=factor, min_pixels=vmin, max_pixels=vmax)
            want = want if min(want) > 0 else None
        except (ValueError, AssertionError):
            want = None
        if want is None:
            with pytest.raises(InputError):
                frame_size(h, w, n, factor, VideoOptions(**opts))
        else:
            assert frame_size(h, w, n, factor, VideoOptions(**opts)) == want, (h, w, n, factor, opts)
        checked += 1
    assert checked > 600


# ------------------------------------------------------------------------------------------ bad videos


def _faststart(path, frames=30):
    """An mp4 whose header (moov) comes first: cut short, it still opens and announces every frame."""
    import av
    with av.open(str(path), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            a = np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path.read_bytes()


def test_bad_videos_are_input_errors(clips, tmp_path, monkeypatch):
    def fails(source, match, opts=None):
        with pytest.raises(InputError, match=match):
            read_video(source, opts)

    fails(b"\x00\x01 not a video at all " * 50, "not a video file")
    fails(b"", "empty video data")
    data = clips["2s10"].read_bytes()
    fails(data[: len(data) // 2], "not a video file.*truncated")          # the header (moov) is at the end
    cut = _faststart(tmp_path / "fs.mp4")
    fails(cut[: len(cut) // 2], r"holds \d+ decodable frames, but its header announces 30; the file is truncated")
    fails(write_video(tmp_path / "one.mp4", seconds=0.1), "has 1 frame")
    fails(str(tmp_path / "missing.mp4"), "not found")
    fails("https://example.com/v.mp4", "fetched by the HTTP server")
    fails("data:image/png;base64,AAAA", "not a video")
    fails(clips["2s10"], "asks for more than the 20 frames", VideoOptions(nframes=22))
    fails(clips["2s10"], "select no frames", VideoOptions(video_start=5.0))
    # A codec FFmpeg has no decoder for: rename the Matroska codec id of a good file.
    mkv = write_video(tmp_path / "c.mkv").read_bytes()
    assert mkv.count(b"V_MPEG4/ISO/ASP") == 1
    (tmp_path / "u.mkv").write_bytes(mkv.replace(b"V_MPEG4/ISO/ASP", b"V_QWENVL/NONE/X"))
    fails(tmp_path / "u.mkv", "codec is not supported")
    fails(write_video(tmp_path / "thin.mp4", width=1000, height=4), "aspect ratio over 200")
    monkeypatch.setattr(video_mod, "MAX_FRAME_PIXELS", 64 * 47)
    fails(clips["2s10"], "64x48 pixels are out of range")


@pytest.mark.parametrize("part,match", [
    ({"video": "a.mp4", "fps": 2, "nframes": 4}, "either nframes or fps"),
    ({"video": "a.mp4", "min_pixels": 5000, "max_pixels": 4000}, r"max_pixels \(4000\) is below min_pixels"),
    ({"video": "a.mp4", "min_frames": 8, "max_frames": 4}, "max_frames"),
    ({"video": "a.mp4", "video_start": 3, "video_end": 1}, "video_end"),
    ({"video": "a.mp4", "nframes": 0}, "nframes must be a positive integer"),
    ({"video": "a.mp4", "fps": float("nan")}, "fps must be a positive number"),
    ({"video_url": {"nframes": 4}}, "url: missing"),
    ({"video": 3.5}, "must be a video URL"),
])
def test_contradictory_or_bad_options(part, match):
    with pytest.raises(InputError, match=match):
        normalize_messages([{"role": "user", "content": [part]}])


@pytest.mark.parametrize("codec,ext", [("mpeg4", "mp4"), ("libx264", "mkv"), ("libvpx", "webm")])
@pytest.mark.parametrize("gap", [1, 48])
def test_seeking_picks_the_same_frames_as_decoding_everything(tmp_path, monkeypatch, codec, ext, gap):
    """A 25 s clip at 12 fps sampled at 0.5 fps (12 frames, 27 apart), reached by seeking (the gap of 1 seeks before
    every frame). The frames must be exactly those at the same indices of a full decode, and the counting
    fallback must not have been needed."""
    clip = write_video(tmp_path / f"long.{ext}", seconds=25, fps=12, width=32, height=32, codec=codec)
    monkeypatch.setattr(video_mod, "SEEK_GAP_FRAMES", gap)
    monkeypatch.setattr(video_mod, "_decode_counting", lambda *a: pytest.fail("fell back to counting frames"))
    opts = VideoOptions(fps=0.5, min_pixels=1024, max_pixels=1024)
    v = read_video(clip, opts, patch_size=16)
    full = decode_all(clip)
    assert len(full) == 300 and v.frame_indices == [0, 27, 54, 82, 109, 136, 163, 190, 217, 245, 272, 299]
    for frame, i in zip(v.frames, v.frame_indices):
        np.testing.assert_array_equal(frame, resize_frame(full[i], 32, 32))
    # with video_start the first wanted frame is far in as well
    v = read_video(clip, VideoOptions(video_start=20.0, nframes=4, min_pixels=1024, max_pixels=1024), patch_size=16)
    assert v.frame_indices == [240, 260, 279, 299]
    for frame, i in zip(v.frames, v.frame_indices):
        np.testing.assert_array_equal(frame, resize_frame(full[i], 32, 32))


@pytest.mark.parametrize("codec,ext", [("mpeg4", "mp4"), ("libx264", "mkv"), ("libvpx", "webm"), ("mpeg4", "avi")])
def test_damaged_files_decode_or_raise_input_error(tmp_path, codec, ext):
    """Random byte flips and cuts: a frame list or an InputError, never another exception (a 500 on the server)."""
    data = write_video(tmp_path / f"f.{ext}", seconds=1, codec=codec).read_bytes()
    rng = np.random.default_rng(1)
    outcomes = set()
    for k in range(30):
        b = bytearray(data)
        for _ in range(rng.integers(1, 20)):
            b[rng.integers(0, len(b))] = rng.integers(0, 256)
        if k % 3 == 0:
            b = b[: rng.integers(10, len(b))]
        try:
            v = read_video(bytes(b), VideoOptions(min_pixels=1024, max_pixels=4096))
            assert len(v.frames) == len(v.frame_indices) >= 2
            outcomes.add("frames")
        except InputError:
            outcomes.add("error")
    assert "error" in outcomes
