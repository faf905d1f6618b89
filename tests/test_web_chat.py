"""Web demo logic without a browser: streaming into turns, boxes drawn, errors as sentences, the auth gate."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from PIL import Image

from qwenvl.engine.errors import EngineFull
from qwenvl.inputs import AdmissionPolicy
from qwenvl.answers.outputs import RequestOutput
from qwenvl.web.auth import COOKIE, WebAuthGate, session_token
from qwenvl.web.chat import ChatSession, Limits, Options, Turn, readable


class FakePrompt:
    def __init__(self, n):
        self.token_ids = list(range(n))
        self.reasoning_opened = False


class FakeEngine:
    """AsyncEngine's front end: records the messages it was given and streams `pieces`."""

    def __init__(self, pieces=("Hel", "lo"), boxes=(), prompt_len=10, fail=None):
        self.pieces, self.boxes, self.prompt_len, self.fail = pieces, list(boxes), prompt_len, fail
        self.messages = self.params = None

    async def prepare(self, messages):
        self.messages = messages
        return FakePrompt(self.prompt_len)

    async def generate(self, prompt, params, request_id=None):
        self.params = params
        if self.fail is not None:
            raise self.fail
        text = ""
        for i, piece in enumerate(self.pieces):
            text += piece
            last = i == len(self.pieces) - 1
            yield RequestOutput(request_id or "r", text=text, delta_text=piece, finish_reason="stop" if last else None,
                                boxes=self.boxes if last else [])


def run(session, turns, options=Options()):
    async def go():
        return [(t.answer, t.done) async for t in session.respond(turns, options)]
    return asyncio.run(go())


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (100, 80), (200, 220, 200)).save(path)
    return str(path)


def test_streams_then_draws_boxes_on_the_right_image(tmp_path, image):
    box = {"label": "the square", "x1": 10, "y1": 10, "x2": 50, "y2": 40, "image_index": 1}
    engine = FakeEngine(pieces=("<|object_ref_start|>the square<|object_ref_end|>", "<|box_start|>(1,2),(3,4)",
                                "<|box_end|>"), boxes=[box])
    session = ChatSession(engine, Limits(AdmissionPolicy(default_max_pixels=200_000), max_model_len=100), out_dir=str(tmp_path / "o"))
    turns = [Turn("Describe.", [image], answer="A green field.", done=True), Turn("Locate the square.", [image])]
    states = run(session, turns, Options(temperature=0.5, top_p=0.9, max_tokens=500))
    assert len(states) == 4 and states[-1][1] and not any(done for _, done in states[:-1])   # streamed, then done
    last = turns[-1]
    assert last.error is None and last.answer.endswith("<|box_end|>")
    assert readable(last.answer) == "**the square** `[(1,2),(3,4)]`"
    # history: both turns' images, the earlier answer raw; per-image max_pixels from the low-res cap
    roles = [m["role"] for m in engine.messages]
    assert roles == ["user", "assistant", "user"] and engine.messages[1]["content"] == [{"type": "text", "text": "A green field."}]
    assert [p["max_pixels"] for m in engine.messages[::2] for p in m["content"] if "image" in p] == [200_000] * 2
    assert (engine.params.temperature, engine.params.top_p, engine.params.max_tokens) == (0.5, 0.9, 90)  # context room
    [drawn] = last.annotated
    with Image.open(drawn) as im:
        assert im.size == (100, 80) and im.getpixel((10, 25)) != (200, 220, 200)   # an outline on the left edge


def test_high_resolution_raises_the_pixel_cap(image):
    for high, default, expected in ((True, None, 16384 * 28 * 28), (False, None, 1280 * 28 * 28),
                                    (True, 200_000, 200_000), (False, 20 * 10**6, 1280 * 28 * 28)):
        engine = FakeEngine()
        run(ChatSession(engine, Limits(AdmissionPolicy(default_max_pixels=default))), [Turn("Hi", [image])],
            Options(high_resolution=high))
        assert engine.messages[0]["content"][0]["max_pixels"] == expected


@pytest.mark.parametrize("case", ["not_image", "too_many_bytes", "too_many_pixels", "too_many_images", "missing"])
def test_bad_images_become_a_message(tmp_path, image, case):
    limits = Limits(AdmissionPolicy(max_images=2, max_image_bytes=10_000, max_image_pixels=50_000))
    bad = tmp_path / "bad.png"
    if case == "not_image":
        bad.write_bytes(b"this is not a picture")
    elif case == "too_many_bytes":
        bad.write_bytes(b"\0" * 20_000)
    elif case == "too_many_pixels":
        Image.new("RGB", (300, 300)).save(bad)
    images = {"too_many_images": [image] * 3, "missing": [str(tmp_path / "gone.png")]}.get(case, [str(bad)])
    engine = FakeEngine()
    turns = [Turn("What is it?", images)]
    run(ChatSession(engine, limits), turns)
    expected = {"not_image": "not an image", "too_many_bytes": "MB", "too_many_pixels": "pixels",
                "too_many_images": "3 images, the limit is 2", "missing": "attach the image again"}[case]
    assert expected in turns[0].error and turns[0].done and engine.params is None
    assert "Traceback" not in turns[0].error


@pytest.mark.parametrize("fail, expected", [(EngineFull("9 requests"), "busy"), (ValueError("prompt too long"), "Clear"),
                                            (RuntimeError("boom"), "went wrong")])
def test_engine_failures_become_a_message(image, fail, expected):
    turns = [Turn("Hi", [image])]
    run(ChatSession(FakeEngine(fail=fail), Limits()), turns)
    assert expected in turns[0].error


def test_errored_turns_stay_out_of_the_history_and_full_context_is_refused(image):
    engine = FakeEngine(prompt_len=100)
    turns = [Turn("bad", [], error="x", done=True), Turn("Hi", [image])]
    run(ChatSession(engine, Limits(max_model_len=100)), turns)
    assert [m["role"] for m in engine.messages] == ["user"]
    assert "context is 100" in turns[-1].error


def test_readable_hides_markers_and_unfinished_tags():
    text = "<|object_ref_start|>猫<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|>"
    assert readable(text) == "**猫** `[(1,2),(3,4)]`"
    assert readable("A cat <|box_sta") == "A cat"


# ------------------------------------------------------------------ auth gate
async def _inner(scope, receive, send):
    if scope["type"] == "websocket":
        await send({"type": "websocket.accept"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": scope["path"].encode()})


def test_auth_gate_guards_every_ui_path_and_lets_the_api_through():
    gate = WebAuthGate(_inner, api_key="k3y", open_prefixes=("/v1/",), open_paths=("/health",))

    async def go():
        transport = httpx.ASGITransport(app=gate)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            for path in ("/", "/config", "/gradio_api/queue/join", "/gradio_api/upload", "/gradio_api/file=/etc/x",
                         "/assets/index.js", "/anything"):
                r = await c.post(path)
                assert r.status_code == 401 and "sign in" in r.json()["error"]["message"], path
            r = await c.get("/", headers={"accept": "text/html"})
            assert r.status_code == 303 and r.headers["location"] == "/login"
            assert (await c.get("/v1/models")).status_code == 200 and (await c.get("/health")).status_code == 200
            assert (await c.get("/login")).status_code == 200
            assert (await c.post("/login", data={"key": "nope"})).status_code == 401
            r = await c.post("/login", data={"key": "k3y"})
            assert r.status_code == 303 and r.cookies[COOKIE] == session_token("k3y")
            assert "HttpOnly" in r.headers["set-cookie"]
            assert (await c.get("/config")).status_code == 200                      # the cookie now rides along
            c.cookies.clear()
            assert (await c.get("/config", headers={"authorization": "Bearer k3y"})).status_code == 200
            assert (await c.get("/config", headers={"cookie": f"{COOKIE}={session_token('other')}"})).status_code == 401
            r = await c.get("/logout")
            assert r.status_code == 303 and "Max-Age=0" in r.headers["set-cookie"]

        sent = []

        async def receive():
            return {"type": "websocket.connect"}

        async def send(message):
            sent.append(message)
        await gate({"type": "websocket", "path": "/gradio_api/ws", "headers": []}, receive, send)
        assert sent == [{"type": "websocket.close", "code": 1008}]

    asyncio.run(go())


def test_render_folds_a_thinking_models_reasoning_above_the_answer():
    from qwenvl.web.app import render

    done = Turn(text="How many?", answer="<think>Two red squares.</think>\n\nThere are **two**.", done=True)
    opened = Turn(text="And now?", answer="Still two.\n</think>\n\nTwo.", done=True, reasoning_opened=True)
    plain = Turn(text="Hi", answer="Hello.", done=True)
    first, second, third = (m["content"][0] for m in render([done, opened, plain]) if m["role"] == "assistant")
    assert first == "<details><summary>Reasoning</summary>\n\nTwo red squares.\n\n</details>\n\nThere are **two**."
    assert second.startswith("<details><summary>Reasoning</summary>\n\nStill two.") and second.endswith("Two.")
    assert third == "Hello."


def test_render_shows_a_tool_call_as_a_call():
    from qwenvl.web.app import render

    turn = Turn(text="Weather?", done=True,
                answer='Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    shown = render([turn])[-1]["content"][0]
    assert shown == 'Let me check.\n\n🔧 **get_weather**`({"city": "Oslo"})`' and "<tool_call>" not in shown


def test_a_video_and_a_pdf_upload_go_to_the_model(tmp_path):
    import io as _io

    import pypdfium2 as pdfium
    from video_files import write_video

    clip = write_video(tmp_path / "clip.mp4", seconds=1, fps=4)
    doc = pdfium.PdfDocument.new()
    for w, h in ((612, 792), (792, 612)):
        doc.new_page(w, h)
    buf = _io.BytesIO()
    doc.save(buf)
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(buf.getvalue())
    engine = FakeEngine()
    turns = [Turn("What happens, and what does the report say?", [str(clip), str(pdf)])]
    run(ChatSession(engine, Limits()), turns)
    assert turns[0].error is None
    kinds = [p["type"] for p in engine.messages[0]["content"]]
    assert kinds == ["video", "image", "image", "text"]            # the PDF's two pages, in order
    assert engine.messages[0]["content"][0]["video"] == str(clip)
    small = Limits(AdmissionPolicy(max_images=1))
    turns = [Turn("Read it.", [str(pdf)])]
    run(ChatSession(FakeEngine(), small), turns)
    assert "2 pages selected, more than the limit of 1" in turns[0].error


def test_the_bundled_model_is_offered_only_examples_it_was_trained_on():
    """Counting, colour and grounding (in its own phrasing) for the bundled model; a real checkpoint gets all."""
    from qwenvl.synthetic import QUESTIONS
    from qwenvl.web.examples import examples
    bundled, every = examples(bundled_model=True), examples()
    trained = {QUESTIONS[("count", "en")].format(shape="triangle"), QUESTIONS[("color", "en")].format(shape="circle"),
               QUESTIONS[("count", "zh")].format(shape="圆形"), "Locate the red triangle."}
    assert {prompt for _, _, prompt in bundled} == trained
    assert {label for label, _, _ in every} - {label for label, _, _ in bundled} == {"Describe", "Read text", "Chart"}
