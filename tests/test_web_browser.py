"""End to end in a real browser: `qwenvl serve` (bundled model, API key on) driven by Debian's chromium.

Asserts the mechanics, not the weak bundled model's answers: the UI is locked without the key, an
image that is not one comes back as a message, a grounding question streams an answer and shows the
image with a box drawn. Set QWENVL_WEB_SCREENSHOT=docs/demo.png to also save the final screenshot there.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageChops

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
SHAPES = ROOT / "examples" / "shapes.png"
KEY = "web-test-key"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]

pytestmark = pytest.mark.slow

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api",
                                     reason="playwright is not installed (pip install playwright)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web")
    port = _free_port()
    env = dict(os.environ, TMPDIR=str(tmp), GRADIO_TEMP_DIR=str(tmp / "gradio"), GRADIO_ANALYTICS_ENABLED="False",
               OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    env.pop("QWENVL_API_KEY", None)
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "qwenvl", "serve", "--port", str(port), "--api-key", KEY,
                             "--drain-grace", "1"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"qwenvl serve exited with {proc.returncode}:\n{(tmp / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"qwenvl serve did not start in 240 s:\n{(tmp / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, tmp
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_ui_routes_need_the_key(server):
    url, _ = server
    with httpx.Client(base_url=url, timeout=10) as c:
        assert c.get("/", headers={"accept": "text/html"}).headers.get("location") == "/login"
        for method, path in (("GET", "/config"), ("GET", "/gradio_api/info"), ("POST", "/gradio_api/queue/join"),
                             ("POST", "/gradio_api/upload"), ("GET", f"/gradio_api/file={SHAPES}")):
            assert c.request(method, path).status_code == 401, path
        assert c.get("/config", headers={"authorization": f"Bearer {KEY}"}).status_code == 200
        assert c.get("/v1/models").status_code == 401                     # the API keeps its own check
        assert c.get("/v1/models", headers={"authorization": f"Bearer {KEY}"}).status_code == 200


def test_chat_streams_and_draws_boxes_in_a_browser(server):
    url, tmp = server
    bad = tmp / "broken.png"
    bad.write_bytes(b"not really a png")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1100})
            page.set_default_timeout(60_000)
            page.goto(url + "/")
            assert page.url.endswith("/login")
            page.fill("#key", "wrong")
            page.click("button[type=submit]")
            page.wait_for_selector("text=That key is not right")
            page.fill("#key", KEY)
            page.click("button[type=submit]")
            textbox = "#qwenvl-input textarea"
            page.wait_for_selector(textbox)
            assert "qwenvl-bundled" in page.inner_text("#qwenvl-header") and "cpu" in page.inner_text("#qwenvl-header")

            # a file that is not an image: a sentence in the chat, no trace
            page.set_input_files("#qwenvl-input input[type=file]", str(bad))
            page.wait_for_selector("#qwenvl-input img, #qwenvl-input .thumbnail-item", state="attached")
            page.fill(textbox, "What is this?")
            page.press(textbox, "Enter")
            page.wait_for_selector("#qwenvl-chat >> text=not an image")
            chat = page.inner_text("#qwenvl-chat")
            assert "⚠️" in chat and "Traceback" not in chat
            page.click("#qwenvl-clear")
            page.wait_for_function("() => !document.querySelector('#qwenvl-chat .bot')")

            # every distinct text of the latest answer, as the DOM changes
            page.evaluate("""() => { window.__answers = []; const chat = document.querySelector('#qwenvl-chat');
                new MutationObserver(() => { const bots = chat.querySelectorAll('.bot');
                  const t = bots.length ? bots[bots.length - 1].innerText.trim() : '';
                  if (t && window.__answers[window.__answers.length - 1] !== t) window.__answers.push(t); })
                .observe(chat, {subtree: true, childList: true, characterData: true}); }""")
            page.set_input_files("#qwenvl-input input[type=file]", str(SHAPES))
            page.wait_for_selector("#qwenvl-input img", state="attached")
            page.fill(textbox, "Locate the red triangle.")
            page.press(textbox, "Enter")
            annotated = page.wait_for_selector("#qwenvl-chat .bot img[src*='boxes-']", timeout=180_000)
            page.wait_for_function("() => !document.querySelector('#qwenvl-input textarea').disabled")
            answers = [a for a in page.evaluate("window.__answers") if a not in ("…", "Loading content")]
            assert len(answers) >= 3, f"the answer did not stream: {answers}"        # several partial texts
            assert "<|" not in answers[-1]                                           # markers made readable

            shot = tmp / "web-demo.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("QWENVL_WEB_SCREENSHOT"):
                shutil.copyfile(shot, os.environ["QWENVL_WEB_SCREENSHOT"])

            response = page.request.get(annotated.get_attribute("src"))           # the browser's own cookie
            assert response.ok
            drawn = Image.open(io.BytesIO(response.body())).convert("RGB")
            with Image.open(SHAPES) as original:
                assert drawn.size == original.size
                assert ImageChops.difference(drawn, original.convert("RGB")).getbbox() is not None   # a box is drawn

            # retry answers the same turn again (a fresh annotated image), undo drops the turn
            first = annotated.get_attribute("src")
            page.click("#qwenvl-retry")
            page.wait_for_function("""(first) => {
                const imgs = document.querySelectorAll("#qwenvl-chat .bot img[src*='boxes-']");
                return imgs.length === 1 && imgs[0].src !== first; }""", arg=first, timeout=180_000)
            page.wait_for_function("() => !document.querySelector('#qwenvl-input textarea').disabled")
            assert page.locator("#qwenvl-chat .user").count() >= 1
            page.click("#qwenvl-undo")
            page.wait_for_function("() => !document.querySelector('#qwenvl-chat .bot, #qwenvl-chat .user')")

            # an example fills the input with its prompt and image
            page.get_by_role("button", name="Count").click()
            page.wait_for_function("() => document.querySelector('#qwenvl-input textarea').value === "
                                   "'How many triangles are there?'")
            page.wait_for_selector("#qwenvl-input img", state="attached")
        finally:
            browser.close()


def test_first_screen_shows_title_input_and_examples_at_1280x900(server):
    """A laptop-sized window opens at the top with the title, the input box and the examples all on the
    first screen (the page used to open scrolled down, the title cut off); the bundled model is offered
    only examples of what it was trained on (counting, colour, grounding)."""
    url, _ = server
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(60_000)
            page.goto(url + "/login")
            page.fill("#key", KEY)
            page.click("button[type=submit]")
            page.wait_for_selector("#qwenvl-input textarea")
            page.wait_for_selector("#qwenvl-examples button")
            page.wait_for_timeout(1000)                      # autofocus and late layout have had their go
            assert page.evaluate("window.scrollY") == 0

            def on_screen(selector: str) -> None:
                box = page.locator(selector).first.bounding_box()
                assert box is not None, selector
                assert box["y"] >= 0 and box["y"] + box["height"] <= 900, (selector, box)
                assert box["x"] >= 0 and box["x"] + box["width"] <= 1280, (selector, box)

            on_screen("#qwenvl-header")
            on_screen("#qwenvl-input")
            on_screen("#qwenvl-examples")
            labels = [b.strip() for b in page.locator("#qwenvl-examples button").all_inner_texts() if b.strip()]
            assert {"Count", "Colour", "Locate"} <= set(labels), labels
            assert not {"Read text", "Chart", "Describe"} & set(labels), labels
        finally:
            browser.close()
