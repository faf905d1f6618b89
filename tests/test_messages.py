"""normalize_messages: OpenAI and DashScope shapes to one canonical shape; errors name the message and field."""

import pytest
from PIL import Image

from qwenvl.inputs import InputError, normalize_messages


def test_openai_and_dashscope_shapes_mixed():
    pil = Image.new("RGB", (8, 8))
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "high"}},
            {"type": "image_url", "image_url": "data:image/png;base64,AAAA"},
            {"type": "text", "text": "Compare"},
        ]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": [
            {"image": "file:///tmp/b.png", "min_pixels": 3136, "max_pixels": 50176},
            {"image": pil},
            {"video": ["f1.png", "f2.png"], "fps": 1},
            {"text": "And these?"},
        ]},
    ]
    out = normalize_messages(msgs)
    assert out[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert out[1]["content"] == [
        {"type": "image", "image": "https://x/a.png"},
        {"type": "image", "image": "data:image/png;base64,AAAA"},
        {"type": "text", "text": "Compare"},
    ]
    assert out[2]["content"] == [{"type": "text", "text": "They differ."}]
    assert out[3]["content"] == [
        {"type": "image", "image": "file:///tmp/b.png", "min_pixels": 3136, "max_pixels": 50176},
        {"type": "image", "image": pil},
        {"type": "video", "video": ["f1.png", "f2.png"], "fps": 1.0},
        {"type": "text", "text": "And these?"},
    ]


def test_pixel_limits_inside_image_url_and_other_fields_pass_through():
    msgs = [{"role": "user", "name": "bob", "content": [
        {"type": "image_url", "image_url": {"url": "a.png", "max_pixels": 1000}, "min_pixels": 500}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]
    out = normalize_messages(msgs)
    assert out[0]["name"] == "bob"
    assert out[0]["content"] == [{"type": "image", "image": "a.png", "max_pixels": 1000, "min_pixels": 500}]
    assert out[1] == {"role": "assistant", "content": [], "tool_calls": [{"id": "1"}]}


def test_canonical_input_is_a_fixed_point():
    msgs = [{"role": "user", "content": [{"type": "image", "image": "a.png", "min_pixels": 10},
                                         {"type": "video", "video": ["a.png"]}, {"type": "text", "text": "hi"}]}]
    once = normalize_messages(msgs)
    assert normalize_messages(once) == once


@pytest.mark.parametrize("msgs,match", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    (["hi"], r"messages\[0\]: must be an object"),
    ([{"role": "robot", "content": "x"}], r"messages\[0\]\.role: 'robot'"),
    ([{"role": "user"}, {"role": "user", "content": 5}], r"messages\[1\]\.content: must be a string or a list"),
    ([{"role": "user", "content": [{"foo": 1}]}], r"messages\[0\]\.content\[0\]: part has no known key"),
    ([{"role": "user", "content": [{"type": "audio"}]}], r"messages\[0\]\.content\[0\]\.type: unknown part type"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], r"content\[0\]\.text: must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], r"image_url\.url: missing"),
    ([{"role": "user", "content": [{"image": ""}]}], "empty image source"),
    ([{"role": "user", "content": [{"image": "a.png", "max_pixels": -1}]}], "max_pixels must be a positive"),
    ([{"role": "user", "content": [{"image": "a", "min_pixels": 9, "max_pixels": 4}]}], "larger than max_pixels"),
    ([{"role": "user", "content": [{"video": []}]}], "empty video"),
    ([{"role": "user", "content": [{"video": 3}]}], "list of frame sources"),
    ([{"role": "user", "content": [{"video": ["a"], "fps": 0}]}], "fps must be a positive"),
    ([{"role": "assistant", "content": [{"image": "a.png"}]}], r"messages\[0\]\.content: images and videos"),
])
def test_errors_name_the_message_and_field(msgs, match):
    with pytest.raises(InputError, match=match):
        normalize_messages(msgs)
