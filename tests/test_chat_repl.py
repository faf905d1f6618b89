"""`qwenvl chat`'s interactive session (qwenvl/chat_repl.py) with a scripted model, and LLM.stream on a tiny
checkpoint. The real command runs in tests/test_cli.py."""

from __future__ import annotations

import io

from qwenvl import LLM, SamplingParams
from qwenvl.cli.chat_repl import run_session
from qwenvl.answers.outputs import RequestOutput
from qwenvl.answers.readable import ReadableStream


class Lines(io.StringIO):
    """stdin whose items are lines, or KeyboardInterrupt for a Ctrl-C at the prompt."""

    def __init__(self, items):
        super().__init__()
        self.items = list(items)

    def isatty(self):
        return False

    def readline(self, *a):
        if not self.items:
            return ""
        item = self.items.pop(0)
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        return item + "\n"


class ScriptedLLM:
    """stream() yields `pieces` one output each; a piece that is KeyboardInterrupt is a Ctrl-C at that point."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.conversations: list[list] = []
        self.closed_early = 0
        self.engine = type("E", (), {"model_name": "scripted"})()

    def stream(self, conversation, params):
        self.conversations.append(conversation)
        text, done = "", False
        try:
            pieces = self.answers.pop(0)
            for i, piece in enumerate(pieces):
                if piece is KeyboardInterrupt:
                    raise KeyboardInterrupt
                text += piece
                done = i == len(pieces) - 1
                yield RequestOutput("r", text=text, delta_text=piece, token_ids=[1] * (i + 1),
                                    finish_reason="stop" if done else None)
        finally:
            self.closed_early += not done


def session(llm, *lines, system=None, media=()):
    out, err = io.StringIO(), io.StringIO()
    rc = run_session(llm, SamplingParams(), system, list(media), out=out, err=err, stdin=Lines(lines))
    return rc, out.getvalue(), err.getvalue()


def test_history_clear_bye_and_media_with_the_first_question():
    llm = ScriptedLLM(["Two ", "circles."], ["Red."], ["Hi."], ["never"])
    image = {"image": "/tmp/x.png"}
    rc, out, err = session(llm, "How many?", "", "What colour?", "/clear", "/nope", "Hello", "/bye", "After bye",
                           system="Be brief.", media=[image])
    assert rc == 0 and out.splitlines() == ["Two circles.", "Red.", "Hi."]
    first, second, third = llm.conversations
    assert first == [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [image, {"text": "How many?"}]}]
    assert second[1:] == [first[1], {"role": "assistant", "content": "Two circles."},
                          {"role": "user", "content": [{"text": "What colour?"}]}]
    assert third == [first[0], {"role": "user", "content": [image, {"text": "Hello"}]}]   # cleared: media again
    assert err.count(">>> ") == 7 and "[conversation cleared]" in err and "unknown command /nope" in err


def test_ctrl_c_stops_the_answer_keeps_the_session_and_twice_at_the_prompt_ends():
    llm = ScriptedLLM(["Once ", "upon", KeyboardInterrupt, "never"], ["Short."], ["Asked."])
    rc, out, err = session(llm, "Tell a long story", "Then a short one", KeyboardInterrupt, "Asked?",
                           KeyboardInterrupt, KeyboardInterrupt, "never read")
    assert rc == 0 and llm.closed_early == 1 and "[answer stopped]" in err
    assert out.splitlines() == ["Once upon", "Short.", "Asked."]
    # the stopped answer is not in the history: the second question follows the system-less start
    assert llm.conversations[1] == [{"role": "user", "content": [{"text": "Then a short one"}]}]
    assert "Ctrl-C again" in err and len(llm.conversations) == 3      # "Asked?" was asked: the count reset


def test_an_empty_answer_says_so():
    llm = ScriptedLLM([""], ["  \n"], ["Yes."])
    rc, out, err = session(llm, "Anything?", "Really?", "Now?")
    assert rc == 0 and out.splitlines()[-1] == "Yes." and err.count("(empty answer)") == 2


def test_grounding_prints_readably_and_never_takes_back_what_it_printed():
    answer = "Here: <|object_ref_start|>the cat<|object_ref_end|><|box_start|>(10,20),(30,40)<|box_end|> done"
    stream, printed = ReadableStream(), ""
    for end in range(1, len(answer) + 1):
        printed += stream.push(answer[:end])
        assert "<|" not in printed
    printed += stream.push(answer, final=True)
    assert printed == "Here: **the cat** `[(10,20),(30,40)]` done"


def test_llm_stream_yields_deltas_and_closing_it_frees_the_request(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("qwen2_vl"), dtype="float32", num_kv_blocks=64)
    msgs = [{"role": "user", "content": "Say something."}]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = list(llm.stream(msgs, params))
    assert outs[-1].finish_reason == "length" and len(outs[-1].token_ids) == 8
    assert "".join(o.delta_text for o in outs) == outs[-1].text == llm.chat(msgs, params).text
    stream = llm.stream(msgs, params)
    next(stream)
    assert llm.stats()["kv_blocks_used"] > 0
    stream.close()
    assert llm.stats()["kv_blocks_used"] == 0 and llm.stats()["num_running"] == 0
