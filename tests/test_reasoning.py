"""Thinking output split into reasoning and answer: whole, truncated, and streamed in any chunking."""
import random

import pytest

from qwenvl.answers.reasoning import ReasoningStream, Split, prompt_opens_reasoning, split_reasoning


def test_complete_block():
    assert split_reasoning("<think>\nsum 2+2\n</think>\n\nIt is 4.") == Split("sum 2+2", "It is 4.")


def test_opened_by_prompt():
    assert split_reasoning("sum 2+2\n</think>\n\n4", opened_in_prompt=True) == Split("sum 2+2", "4")
    # a close tag without any open tag still splits (the template opened it)
    assert split_reasoning("r</think>a") == Split("r", "a")


def test_truncated_is_all_reasoning():
    assert split_reasoning("<think>\nstill thinking") == Split("still thinking", "")
    assert split_reasoning("still thinking", opened_in_prompt=True) == Split("still thinking", "")


def test_plain_answer_has_no_reasoning():
    assert split_reasoning("Just 4.") == Split(None, "Just 4.")
    assert split_reasoning("a <think> mid-text is content") == Split(None, "a <think> mid-text is content")


def test_empty_reasoning_block():
    assert split_reasoning("<think>\n\n</think>\n\nhi") == Split("", "hi")


def test_prompt_opens_reasoning():
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n")


def _stream(text: str, cuts: list[int], opened: bool) -> tuple[str, str]:
    s = ReasoningStream(opened_in_prompt=opened)
    r, c = [], []
    prev = 0
    for cut in cuts + [len(text)]:
        dr, dc = s.feed(text[prev:cut])
        r.append(dr), c.append(dc)
        prev = cut
    dr, dc = s.finish()
    return "".join(r + [dr]), "".join(c + [dc])


CASES = [
    ("<think>\nlet me see: a<b and </th is no tag\n</think>\n\nAnswer <b>x</b>", False),
    ("<think>\ncut off mid </thi", False),
    ("reasoning only\n</think>\n\nfinal", True),
    ("no reasoning here at all", False),
    ("<think></think>answer", False),
]


@pytest.mark.parametrize("text,opened", CASES)
def test_stream_matches_whole_split_under_every_chunking(text, opened):
    whole = split_reasoning(text, opened_in_prompt=opened)
    expect = (whole.reasoning or "", whole.content)
    rng = random.Random(0)
    assert _stream(text, [], opened) == expect
    assert _stream(text, list(range(1, len(text))), opened) == expect      # one character at a time
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 6))))
        assert _stream(text, cuts, opened) == expect, cuts


def test_stream_emits_reasoning_before_close_arrives():
    s = ReasoningStream()
    assert s.feed("<think>\nstep one") == ("step one", "")
    assert s.feed(" and two</th") == (" and two", "")
    assert s.feed("ink>\n\nDone") == ("", "Done")


# ------------------------------------------------------------------ enable_thinking through the Python API
THINKING_TAIL = ("{% if add_generation_prompt %}{% if enable_thinking is defined and enable_thinking is false %}"
                 "<think>\n\n</think>\n\n{% else %}<think>\n{% endif %}{% endif %}")


@pytest.fixture(scope="module")
def thinking_llm(tmp_path_factory):
    import shutil
    from pathlib import Path

    from qwenvl import LLM
    src = Path(__file__).resolve().parents[1] / "qwenvl" / "assets" / "bundled"
    dst = tmp_path_factory.mktemp("thinking") / "model"
    shutil.copytree(src, dst)
    template = dst / "chat_template.jinja"
    template.write_text(template.read_text(encoding="utf-8") + THINKING_TAIL, encoding="utf-8")
    return LLM(dst, dtype="float32", device="cpu")


def test_enable_thinking_reaches_the_template(thinking_llm):
    msgs = [{"role": "user", "content": "hello"}]
    thinking = thinking_llm.engine.prepare(msgs)
    plain = thinking_llm.engine.prepare(msgs, chat_template_kwargs={"enable_thinking": False})
    assert thinking.reasoning_opened and not plain.reasoning_opened
    assert len(plain.token_ids) > len(thinking.token_ids)
    out = thinking_llm.chat(msgs, chat_template_kwargs={"enable_thinking": False})
    assert out.finish_reason is not None


def test_chat_template_kwargs_may_not_override_the_conversation(thinking_llm):
    msgs = [{"role": "user", "content": "hello"}]
    with pytest.raises(ValueError, match="messages"):
        thinking_llm.engine.prepare(msgs, chat_template_kwargs={"messages": []})


def test_boxes_come_from_the_answer_only():
    from types import SimpleNamespace

    from qwenvl.answers.outputs import answer_boxes

    img = [SimpleNamespace(kind="image", input_size=(1000, 1000), original_size=(1000, 1000))]
    draft = "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(1,1),(2,2)<|box_end|>"
    final = "<|object_ref_start|>dog<|object_ref_end|><|box_start|>(100,100),(500,500)<|box_end|>"
    boxes = answer_boxes(f"<think>maybe {draft}</think>\n\n{final}", "qwen2_vl", img)
    assert [b["label"] for b in boxes] == ["dog"]
    assert [b["label"] for b in answer_boxes(f"{draft}\n</think>\n{final}", "qwen2_vl", img, reasoning_opened=True)] == ["dog"]
    assert answer_boxes(f"<think>{draft}", "qwen2_vl", img) == []          # cut inside the reasoning: no answer yet
