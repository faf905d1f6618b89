"""inputs.admit: one normalisation, one policy, the caller's messages never changed."""

from __future__ import annotations

import copy

import pytest

from qwenvl.inputs import AdmissionPolicy, InputError, admit, normalize_messages

POLICY = AdmissionPolicy(max_images=2, max_video_frames=3, pixel_factor=28, default_max_pixels=500_000)


def test_caps_are_applied_to_copies_and_normalisation_happens_once():
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:a"}, "max_pixels": 10**9, "min_pixels": 10**8},
        {"image": "b.png"}, {"video": ["f1", "f2"]}, {"text": "what?"}]}]
    before = copy.deepcopy(messages)
    admitted = admit(messages, POLICY)
    assert messages == before
    a, b, video, _ = admitted.conversation[0]["content"]
    low = 1280 * 28 * 28
    assert (a["max_pixels"], a["min_pixels"]) == (low, low)       # a client's budget never exceeds the cap
    assert b["max_pixels"] == min(low, 500_000)                   # the checkpoint's own limit when none is named
    assert admit(messages, POLICY, high_resolution=True).conversation[0]["content"][0]["max_pixels"] == 16384 * 28 * 28
    assert [(r.kind, r.source, r.where) for r in admitted.media] == [
        ("image", "data:a", "messages[0].content[0]"), ("image", "b.png", "messages[0].content[1]"),
        ("frame", "f1", "messages[0].content[2].video[0]"), ("frame", "f2", "messages[0].content[2].video[1]")]
    loaded = admitted.with_media([b"A", b"B", b"F1", b"F2"])
    assert [p.get("image", p.get("video")) for p in loaded[0]["content"][:3]] == [b"A", b"B", [b"F1", b"F2"]]
    assert video["video"] == ["f1", "f2"]                          # the admitted conversation is untouched
    assert normalize_messages(loaded) is loaded                    # the prompt builder does not normalise again


@pytest.mark.parametrize("content, needle", [
    ([{"image": "a"}, {"image": "b"}, {"image": "c"}], "3 images, the limit is 2"),
    ([{"video": ["1", "2"]}, {"video": ["3", "4"]}], "too many video frames: 4"),
    ([{"video": "clip.mp4", "nframes": 4}], "content[0].nframes: 4 frames is over the limit of 3"),
])
def test_over_the_policy_is_an_input_error_naming_it(content, needle):
    with pytest.raises(InputError, match=needle.replace("[", r"\[")):
        admit([{"role": "user", "content": content}], POLICY)


def test_a_video_file_samples_at_most_the_frame_cap():
    part = admit([{"role": "user", "content": [{"video": "clip.mp4", "fps": 1.0}]}], POLICY).conversation[0]["content"][0]
    assert part["max_frames"] == 3
