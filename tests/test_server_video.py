"""Video files through the real server (uvicorn on loopback, real engine, tiny random Qwen2-VL): the OpenAI SDK's
video_url, DashScope's video, http(s) and file:// URLs fetched like images, usage.video_tokens, and 400s."""

from __future__ import annotations

import base64
import functools
import http.server
import threading

import httpx
import openai
import pytest

from qwenvl.engine.async_engine import AsyncEngine
from qwenvl.engine.llm_engine import EngineConfig, LLMEngine
from qwenvl.server.app import create_app
from qwenvl.server.settings import ServerSettings
from test_server_fake_engine import DS_PATH, run_server
from video_files import write_video

SMALL = {"min_pixels": 3136, "max_pixels": 3136}        # 56x56 frames: 4 tokens per temporal patch

MODEL = "qwenvl-test"          # the --served-model-name the test server answers to


def data_url(data: bytes, mime="video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    media = tmp_path_factory.mktemp("videos")
    write_video(media / "clip.mp4", seconds=2, fps=10)
    engine = LLMEngine(tiny_checkpoint("qwen2_vl"), dtype="float32",
                       config=EngineConfig(kv_cache_gb=0.02, max_model_len=256))
    async_engine = AsyncEngine(engine, max_queue=4)
    app = create_app(async_engine, ServerSettings(served_model_name=MODEL, allow_private_urls=True,
                                                  allowed_local_media_path=str(media),
                                                  max_video_frames=8))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(media))
    handler.log_message = lambda *a: None
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    with run_server(app) as url:
        yield {"url": url, "media": media, "http": f"http://127.0.0.1:{files.server_address[1]}/clip.mp4"}
    files.shutdown()
    import asyncio
    asyncio.run(async_engine.shutdown(grace_s=1))


def _ask(server, video_part: dict, route="/v1/chat/completions") -> httpx.Response:
    msgs = [{"role": "user", "content": [video_part, {"type": "text", "text": "What happens?"}]}]
    return httpx.post(server["url"] + route, json={"model": MODEL, "messages": msgs, "max_tokens": 3,
                                                   "temperature": 0}, timeout=60)


def test_openai_sdk_video_url_answers(server):
    clip = (server["media"] / "clip.mp4").read_bytes()
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0)
    r = client.chat.completions.create(model=MODEL, max_tokens=3, temperature=0, messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": data_url(clip), **SMALL}},
        {"type": "text", "text": "What happens?"}]}])
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
    details = r.usage.prompt_tokens_details.model_dump()
    # 20 frames at 10 fps -> 4 frames -> 2 temporal patches of 2x2 merged tokens
    assert details["video_tokens"] == 8 and details["image_tokens"] == 0


def test_http_file_url_and_dashscope_video(server):
    for src in (server["http"], f"file://{server['media']}/clip.mp4"):
        r = _ask(server, {"type": "video_url", "video_url": {"url": src, **SMALL}})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens_details"]["video_tokens"] == 8
    body = {"model": MODEL, "input": {"messages": [{"role": "user", "content": [
        {"video": server["http"], **SMALL}, {"text": "What happens?"}]}]}, "parameters": {"max_tokens": 2}}
    r = httpx.post(server["url"] + DS_PATH, json=body, timeout=60)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["video_tokens"] == usage["input_tokens_details"]["video_tokens"] == 8
    assert usage["input_tokens_details"]["text_tokens"] == usage["input_tokens"] - 8


@pytest.mark.parametrize("part,match", [
    ({"type": "video_url", "video_url": {"url": data_url(b"\x00garbage" * 64)}}, "not a video file"),
    ({"type": "video_url", "video_url": {"url": data_url(b"\x00", "image/png")}}, "not a video"),
    ({"type": "video", "video": "clip.mp4"}, "not a URL"),
    ({"type": "video", "video": "data:video/mp4;base64,AAAA", "fps": 1, "nframes": 4}, "either nframes or fps"),
    ({"type": "video", "video": "data:video/mp4;base64,AAAA", "nframes": 12}, "limit of 8 frames"),
    ({"type": "video", "video": "file:///etc/passwd"}, "outside the allowed"),
])
def test_bad_videos_are_400(server, part, match):
    r = _ask(server, part)
    assert r.status_code == 400, r.text
    assert match in r.json()["error"]["message"]


def test_truncated_video_is_400(server):
    clip = (server["media"] / "clip.mp4").read_bytes()
    r = _ask(server, {"type": "video_url", "video_url": {"url": data_url(clip[: len(clip) // 2])}})
    assert r.status_code == 400 and "truncated" in r.json()["error"]["message"]
