"""The official dashscope SDK's own upload of local files (issue 38 part 2), against the real server (uvicorn on
loopback, the real engine over a tiny random Qwen2-VL): `file://` image, video and PDF parts go through
getPolicy, the form upload and `oss://` resolution, streamed and not, with and without an API key; the answer
equals the one for the same bytes sent as a data: URL. Then everything a hostile client can try: forged and
foreign policies, keys outside the policy's folder, path traversal, other callers' and expired keys, oss://
without the opt-in header, files that are no media, files over the caps."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import tempfile
import time
from pathlib import Path

import dashscope
import httpx
import pytest
from dashscope.common.error import UploadFileException
from PIL import Image

from qwenvl.engine.async_engine import AsyncEngine
from qwenvl.engine.llm_engine import EngineConfig, LLMEngine
from qwenvl.server.app import create_app
from qwenvl.server.settings import ServerSettings
from qwenvl.server.uploads import Grant, UploadLimits, UploadStore
from test_pdf import make_pdf
from test_server_fake_engine import DS_PATH, run_server
from video_files import write_video

MODEL = "qwenvl-test"
KEY = "sk-upload-test"
SMALL = {"min_pixels": 3136, "max_pixels": 3136}        # 56x56: 4 tokens an image, a page, a temporal patch
UPLOADS = "/api/v1/uploads"
OSS = {"X-DashScope-OssResourceResolve": "enable"}


def png(color=(200, 30, 30), size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("local_files")
    (root / "red.png").write_bytes(png())
    (root / "green.png").write_bytes(png((20, 200, 40)))
    write_video(root / "clip.mp4", seconds=2, fps=10)
    (root / "doc.pdf").write_bytes(make_pdf([(400, 300)]))
    (root / "notes.txt").write_text("not a picture\n" * 100)
    (root / "big.png").write_bytes(png(size=(64, 48)) + b"\0" * 150_000)   # a PNG with 150 KB of trailing bytes
    return {p.name: p for p in root.iterdir()}


@pytest.fixture(scope="module")
def servers(tiny_checkpoint):
    engine = AsyncEngine(LLMEngine(tiny_checkpoint("qwen2_vl"), dtype="float32",
                                   config=EngineConfig(kv_cache_gb=0.02, max_model_len=256)), max_queue=8)
    keyed = create_app(engine, ServerSettings(api_key=KEY, served_model_name=MODEL))
    open_ = create_app(engine, ServerSettings(served_model_name=MODEL))
    tight = create_app(engine, ServerSettings(served_model_name=MODEL, upload_ttl_s=4.0,
                                              max_image_bytes=100_000, max_video_bytes=200_000,
                                              upload_concurrency=1))
    with run_server(keyed) as k, run_server(open_) as o, run_server(tight) as t:
        yield {"keyed": k, "open": o, "tight": t, "store": keyed.state.qwenvl.uploads}
    asyncio.run(engine.shutdown(grace_s=1))


def sdk_call(base: str, content: list, api_key: str = KEY, stream: bool = False):
    """MultiModalConversation.call exactly as a user writes it, local files as file:// URLs."""
    dashscope.base_http_api_url = base + "/api/v1"
    return dashscope.MultiModalConversation.call(
        model=MODEL, api_key=api_key, messages=[{"role": "user", "content": content}], max_tokens=4,
        temperature=0, stream=stream, **({"incremental_output": True} if stream else {}))


def sdk_text(reply) -> str:
    assert reply.status_code == 200, (reply.code, reply.message)
    return "".join(p.get("text", "") for p in reply.output.choices[0].message.content)


def data_call(base: str, content: list, api_key: str = KEY) -> dict:
    """The same request with the file's bytes inline: what the uploaded one must answer alike."""
    r = httpx.post(base + DS_PATH, headers={"Authorization": f"Bearer {api_key}"}, timeout=120, json={
        "model": MODEL, "input": {"messages": [{"role": "user", "content": content}]},
        "parameters": {"max_tokens": 4, "temperature": 0}})
    assert r.status_code == 200, r.text
    return r.json()


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def policy(base: str, api_key: str | None = KEY) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(base + UPLOADS, params={"action": "getPolicy", "model": MODEL}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["data"]


def form_upload(data: dict, content: bytes, name: str = "a.png", key: str | None = None) -> httpx.Response:
    fields = {"OSSAccessKeyId": data["oss_access_key_id"], "Signature": data["signature"], "policy": data["policy"],
              "key": key if key is not None else f"{data['upload_dir']}/{name}", "success_action_status": "200"}
    return httpx.post(data["upload_host"], data=fields, files={"file": (name, content)})


def oss_call(base: str, url: str, api_key: str = KEY, header: bool = True, kind: str = "image") -> httpx.Response:
    headers = {"Authorization": f"Bearer {api_key}", **(OSS if header else {})}
    return httpx.post(base + DS_PATH, headers=headers, timeout=120, json={
        "model": MODEL, "input": {"messages": [{"role": "user", "content": [{kind: url, **SMALL}, {"text": "hi"}]}]},
        "parameters": {"max_tokens": 2}})


# ------------------------------------------------------------------ the SDK, unchanged
@pytest.mark.parametrize("which", ["keyed", "open"])
def test_sdk_sends_a_local_image_video_and_pdf(servers, files, which):
    base = servers[which]
    cases = [("image", files["red.png"], "image/png", "image_tokens"),
             ("video", files["clip.mp4"], "video/mp4", "video_tokens"),
             ("image", files["doc.pdf"], "application/pdf", "image_tokens")]       # a PDF goes where an image goes
    store = servers["store"] if which == "keyed" else None
    for kind, path, mime, tokens in cases:
        content = [{kind: path.as_uri(), **SMALL}, {"text": "What is this?"}]
        before = store.stored_bytes if store else 0
        reply = sdk_call(base, content)
        if store:                               # the SDK's upload landed in the store, file for file
            assert store.stored_bytes - before == path.stat().st_size
        text = sdk_text(reply)
        inline = data_call(base, [{kind: data_url(path, mime), **SMALL}, {"text": "What is this?"}])
        assert text == inline["output"]["choices"][0]["message"]["content"][0]["text"], path.name
        assert reply.usage[tokens] == inline["usage"][tokens] > 0, path.name
        streamed = "".join(sdk_text(r) for r in sdk_call(base, content, stream=True))
        assert streamed == text, path.name


def test_sdk_frames_and_two_files_in_one_message(servers, files):
    """One policy serves every file of a call; frames of a frame-list video are uploaded one by one."""
    both = [{"image": files["red.png"].as_uri(), **SMALL}, {"image": files["green.png"].as_uri(), **SMALL},
            {"text": "Compare them."}]
    assert sdk_text(sdk_call(servers["keyed"], both))
    frames = [files["red.png"].as_uri(), files["green.png"].as_uri()] * 2
    reply = sdk_call(servers["keyed"], [{"video": frames, **SMALL}, {"text": "What happens?"}])
    assert sdk_text(reply) and reply.usage["video_tokens"] > 0


def test_an_upload_is_read_only_with_the_same_key_and_the_header(servers, files):
    base = servers["open"]          # no --api-key: the Bearer token a caller sends still scopes its uploads
    data = policy(base, "alice")
    assert data["upload_host"] == base + UPLOADS and data["upload_dir"].startswith("qwenvl-uploads/")
    r = form_upload(data, files["red.png"].read_bytes(), "red.png")
    assert r.status_code == 200, r.text
    url = "oss://" + r.json()["key"]
    assert oss_call(base, url, "alice").status_code == 200
    other = oss_call(base, url, "bob")
    assert other.status_code == 404 and other.json()["code"] == "NotFound"
    assert "uploaded with another API key" in other.json()["message"] and other.json()["request_id"]
    no_header = oss_call(base, url, "alice", header=False)
    assert no_header.status_code == 400 and "X-DashScope-OssResourceResolve: enable" in no_header.json()["message"]
    openai_route = httpx.post(base + "/v1/chat/completions", headers={**OSS, "Authorization": "Bearer alice"}, json={
        "model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
    assert openai_route.status_code == 400          # OpenAI's own route never reads DashScope uploads
    compat = httpx.post(base + "/compatible-mode/v1/chat/completions", headers={**OSS, "Authorization": "Bearer alice"},
                        json={"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [
                            {"type": "image_url", "image_url": {"url": url, **SMALL}}]}]})
    assert compat.status_code == 200, compat.text


def test_the_api_key_guards_the_policy_and_the_policy_guards_the_upload(servers, files):
    base = servers["keyed"]
    r = httpx.get(base + UPLOADS, params={"action": "getPolicy", "model": MODEL})
    assert r.status_code == 401 and r.json()["code"] == "InvalidApiKey"
    dashscope.base_http_api_url = base + "/api/v1"
    with pytest.raises(UploadFileException, match="InvalidApiKey"):
        dashscope.MultiModalConversation.call(model=MODEL, api_key="wrong", messages=[
            {"role": "user", "content": [{"image": files["red.png"].as_uri()}, {"text": "hi"}]}])
    wrong_model = httpx.get(base + UPLOADS, params={"action": "getPolicy", "model": "gpt-4"}, headers={
        "Authorization": f"Bearer {KEY}"})
    assert wrong_model.status_code == 404 and wrong_model.json()["code"] == "ModelNotFound"
    bad_action = httpx.get(base + UPLOADS, params={"action": "list"}, headers={"Authorization": f"Bearer {KEY}"})
    assert bad_action.status_code == 400 and "getPolicy" in bad_action.json()["message"]

    data = policy(base)
    image = files["red.png"].read_bytes()
    forged = form_upload({**data, "signature": base64.b64encode(b"x" * 32).decode()}, image)
    assert forged.status_code == 403 and forged.json()["code"] == "AccessDenied"
    decoded = json.loads(base64.b64decode(data["policy"]))
    widened = base64.b64encode(json.dumps({**decoded, "max_bytes": 10 ** 12}).encode()).decode()
    assert form_upload({**data, "policy": widened}, image).status_code == 403      # the signature covers the policy
    foreign = form_upload({**policy(servers["open"], KEY), "upload_host": data["upload_host"]}, image)
    assert foreign.status_code == 403                                             # another server's policy
    outside = form_upload(data, image, key="qwenvl-uploads/" + "0" * 32 + "/a.png")
    assert outside.status_code == 400 and "outside the policy's upload_dir" in outside.json()["message"]
    for name in ("../escape.png", "sub/dir.png", "..", "a\\b.png", "a\x00.png", "x" * 300):
        r = form_upload(data, image, key=f"{data['upload_dir']}/{name}")
        assert r.status_code == 400, (name, r.text)
    missing = httpx.post(data["upload_host"], data={"key": data["upload_dir"] + "/a.png"},
                         files={"file": ("a.png", image)})
    assert missing.status_code == 400 and "policy" in missing.json()["message"]
    not_a_form = httpx.post(data["upload_host"], json={"key": "x"})
    assert not_a_form.status_code == 415
    ok = form_upload(data, image)
    assert ok.status_code == 200 and ok.json()["kind"] == "image"
    assert oss_call(base, "oss://" + ok.json()["key"]).status_code == 200


def test_forged_and_traversing_oss_urls_never_reach_a_file(servers, files, tmp_path):
    base = servers["keyed"]
    store = servers["store"]
    data = policy(base)
    real = form_upload(data, files["red.png"].read_bytes(), "red.png").json()["key"]
    secret = tmp_path / "secret.png"
    secret.write_bytes(png())
    forged = [f"oss://{secret}", "oss://../../etc/passwd", f"oss://{data['upload_dir']}/../../etc/passwd",
              f"oss://{data['upload_dir']}/", "oss://qwenvl-uploads/not-hex/red.png", f"oss://{real}/../red.png",
              "oss://" + real.replace("qwenvl-uploads/", "qwenvl-uploads/../")]
    for url in forged:
        r = oss_call(base, url)
        assert r.status_code == 400 and r.json()["code"] == "InvalidParameter", (url, r.text)
        assert "not a file uploaded to this server" in r.json()["message"]
    unknown = oss_call(base, "oss://qwenvl-uploads/" + "0" * 32 + "/red.png")
    assert unknown.status_code == 404 and unknown.json()["code"] == "NotFound"
    other_name = oss_call(base, f"oss://{data['upload_dir']}/green.png")
    assert other_name.status_code == 404
    # files are kept under names of the store's own, inside its folder
    stored = [p for p in store.root.iterdir()]
    assert stored and all(p.name.endswith(".upload") and len(p.stem) == 32 for p in stored)
    assert not any("red" in p.name for p in stored)


def test_content_is_sniffed_and_sizes_are_capped(servers, files):
    base = servers["tight"]                 # images up to 100 KB, other files up to 200 KB, kept 4 s
    data = policy(base)
    text = form_upload(data, files["notes.txt"].read_bytes(), "notes.png")      # the name does not make it a PNG
    assert text.status_code == 415 and "not an image" in text.json()["message"]
    empty = form_upload(data, b"", "empty.png")
    assert empty.status_code == 400 and "empty" in empty.json()["message"]
    big_image = form_upload(data, files["big.png"].read_bytes(), "big.png")
    assert big_image.status_code == 413 and "per image" in big_image.json()["message"]
    too_big = form_upload(data, b"\0" * 400_000, "huge.mp4")
    assert too_big.status_code == 413 and too_big.json()["code"] == "RequestTooLarge"
    fields = {"policy": data["policy"], "Signature": data["signature"], "key": data["upload_dir"] + "/x.mp4"}
    form = httpx.Request("POST", data["upload_host"], data=fields, files={"file": ("x.mp4", b"\0" * 400_000)})
    body = form.read()
    chunked = httpx.post(data["upload_host"], headers={"Content-Type": form.headers["content-type"]},
                         content=(body[i:i + 65536] for i in range(0, len(body), 65536)))
    assert chunked.status_code == 413, chunked.text      # no Content-Length: counted while it arrives
    clip = form_upload(policy(base), files["clip.mp4"].read_bytes(), "clip.mp4").json()
    assert clip["kind"] == "video"
    as_image = oss_call(base, "oss://" + clip["key"])
    assert as_image.status_code == 400 and "is a video, not an image" in as_image.json()["message"]
    assert oss_call(base, "oss://" + clip["key"], kind="video").status_code == 200
    pdf = form_upload(policy(base), files["doc.pdf"].read_bytes(), "scan").json()      # a PDF without .pdf in its name
    assert pdf["kind"] == "pdf"
    unnamed = oss_call(base, "oss://" + pdf["key"])
    assert unnamed.status_code == 400 and "name ends in .pdf" in unnamed.json()["message"]
    data = policy(base)
    image = form_upload(data, files["red.png"].read_bytes(), "red.png").json()
    time.sleep(4.3)
    expired = oss_call(base, "oss://" + image["key"])
    assert expired.status_code == 404 and "expired" in expired.json()["message"]
    late = form_upload(data, files["red.png"].read_bytes(), "red.png")
    assert late.status_code == 403 and "expired" in late.json()["message"]


def test_uploads_arriving_at_once_are_bounded(servers, files):
    import threading

    base = servers["tight"]                 # one upload at a time
    data = policy(base)
    form = httpx.Request("POST", data["upload_host"], data={
        "policy": data["policy"], "Signature": data["signature"], "key": data["upload_dir"] + "/red.png"},
        files={"file": ("red.png", files["red.png"].read_bytes())})
    body, arrived = form.read(), threading.Event()

    def slowly():
        yield body[:100]
        arrived.set()
        time.sleep(1.5)
        yield body[100:]

    result = {}
    slow = threading.Thread(target=lambda: result.setdefault("r", httpx.post(
        data["upload_host"], content=slowly(), headers={"Content-Type": form.headers["content-type"]}, timeout=30)))
    slow.start()
    assert arrived.wait(10)
    time.sleep(0.3)
    busy = form_upload(data, files["green.png"].read_bytes(), "green.png")
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1" and busy.json()["code"] == "Throttling"
    slow.join(30)
    assert result["r"].status_code == 200, result["r"].text
    assert form_upload(policy(base), files["green.png"].read_bytes(), "green.png").status_code == 200   # free again


def test_the_store_is_bounded_and_evicts_the_oldest(tmp_path):
    now = [1000.0]
    store = UploadStore(str(tmp_path / "store"), UploadLimits(ttl_s=60, store_bytes=250, max_files=3),
                        clock=lambda: now[0])
    owner = store.owner_of("Bearer k")
    grant = Grant(store.issue(owner, "http://x")["upload_dir"], owner, 1000)

    def put(name: str, size: int) -> str:
        partial = store.partial_path()
        partial.write_bytes(b"x" * size)
        return store.put(grant, name, partial, "image")

    keys = [put(f"f{i}", 100) for i in range(3)]            # 300 bytes > 250: f0 went to make room for f2
    assert store.stored_bytes == 200
    with pytest.raises(Exception, match="was not found"):
        store.find("oss://" + keys[0], owner, "w")
    assert store.find("oss://" + keys[2], owner, "w").size == 100
    for i in range(3, 6):
        put(f"f{i}", 10)
    assert len(list(store.root.iterdir())) == 3            # max_files
    put("f5", 20)                                           # the same key again replaces it
    assert store.find(f"oss://{grant.upload_dir}/f5", owner, "w").size == 20
    now[0] += 61
    with pytest.raises(Exception, match="expired"):
        store.find(f"oss://{grant.upload_dir}/f5", owner, "w")
    assert store.stored_bytes == 0 and not list(store.root.iterdir())
    put("f6", 10)
    (store.root / ("a" * 32 + ".upload")).write_bytes(b"an earlier run's")
    (store.root / "mine.txt").write_bytes(b"the operator's")
    store.close()
    assert [p.name for p in store.root.iterdir()] == ["a" * 32 + ".upload", "mine.txt"]   # a given folder stays
    again = UploadStore(str(tmp_path / "store"))
    assert [p.name for p in again.root.iterdir()] == ["mine.txt"]     # an earlier run's uploads are gone

    before = set(Path(tempfile.gettempdir()).glob("qwenvl-uploads-*"))
    temporary = UploadStore()
    assert set(Path(tempfile.gettempdir()).glob("qwenvl-uploads-*")) == before    # nothing until it is used
    folder = temporary.root
    assert folder.is_dir()
    temporary.close()
    assert not folder.exists()
