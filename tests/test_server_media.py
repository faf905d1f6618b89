"""The server's image fetcher without a network: stubbed DNS and an httpx mock transport."""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time

import httpx
import pytest
from PIL import Image

from qwenvl.server.app import create_app
from qwenvl.server.errors import APIError
from qwenvl.server.media import (MediaFetcher, MediaPolicy, always_forbidden_reason, check_header, decode_data_url,
                                 forbidden_reason)
from qwenvl.server.settings import ServerSettings
from test_server_fake_engine import FakeAsyncEngine, run_server


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "blue").save(buf, "PNG")
    return buf.getvalue()


DNS = {"public.example": ["93.184.216.34"], "evil.example": ["10.1.2.3"], "mixed.example": ["93.184.216.34", "127.0.0.1"],
       "v6.example": ["::ffff:192.168.0.1"]}


async def _resolver(host, port):
    return DNS[host]


def _fetch(url, handler, **policy):
    seen = []

    def record(request):
        seen.append(request)
        return handler(request)

    async def go():
        fetcher = MediaFetcher(MediaPolicy(**policy), resolver=_resolver, transport=httpx.MockTransport(record))
        try:
            return await fetcher.load(url, "image")
        finally:
            await fetcher.aclose()
    return asyncio.run(go()), seen


@pytest.mark.parametrize("address, reason", [
    ("127.0.0.1", "loopback"), ("10.0.0.5", "private"), ("192.168.1.1", "private"), ("169.254.169.254", "link-local"),
    ("224.0.0.1", "multicast"), ("0.0.0.0", "unspecified"), ("::1", "loopback"), ("fe80::1", "link-local"),
    ("::ffff:127.0.0.1", "loopback"), ("100.64.0.1", "non-global"), ("240.0.0.1", "reserved"),
    ("93.184.216.34", None), ("2606:4700::1111", None)])
def test_forbidden_addresses(address, reason):
    assert forbidden_reason(address) == reason


def test_connects_to_the_checked_address_with_the_original_host_header():
    data, seen = _fetch("http://public.example/cat.png?x=1", lambda r: httpx.Response(200, content=_png()))
    assert data == _png()
    assert seen[0].url.host == "93.184.216.34" and seen[0].headers["host"] == "public.example"
    assert seen[0].url.query == b"x=1"


@pytest.mark.parametrize("host", ["evil.example", "mixed.example", "v6.example"])
def test_private_hosts_refused_unless_allowed(host):
    with pytest.raises(APIError, match="allow-private-urls") as e:
        _fetch(f"http://{host}/a.png", lambda r: httpx.Response(200, content=_png()))
    assert e.value.status == 400
    data, _ = _fetch(f"http://{host}/a.png", lambda r: httpx.Response(200, content=_png()), allow_private_urls=True)
    assert data == _png()


def test_redirect_to_a_forbidden_host_is_refused():
    def handler(request):
        if request.headers["host"] == "public.example":
            return httpx.Response(302, headers={"Location": "http://evil.example/meta"})
        raise AssertionError("the forbidden host must never be contacted")
    with pytest.raises(APIError, match="private"):
        _fetch("http://public.example/a.png", handler)


def test_redirect_loop_and_byte_cap_and_http_errors():
    with pytest.raises(APIError, match="redirects"):
        _fetch("http://public.example/a", lambda r: httpx.Response(302, headers={"Location": "/a"}))
    with pytest.raises(APIError, match="byte limit"):
        _fetch("http://public.example/a", lambda r: httpx.Response(200, content=b"x" * 5000), max_bytes=1000)
    with pytest.raises(APIError, match="HTTP 404"):
        _fetch("http://public.example/a", lambda r: httpx.Response(404))
    with pytest.raises(APIError, match="timed out"):
        _fetch("http://public.example/a", lambda r: (_ for _ in ()).throw(httpx.ReadTimeout("slow")))


def test_sources_that_are_not_urls_are_refused():
    for src, needle in [("/etc/passwd", "not a URL"), ("ftp://x/y.png", "scheme"), ("file:///etc/passwd", "disabled"),
                        ("data:text/plain;base64,aGk=", "not an image"), ("data:image/png;base64,@@@", "decode")]:
        with pytest.raises(APIError, match=needle):
            _fetch(src, lambda r: httpx.Response(500))


def test_header_checks():
    assert check_header(_png(), "x", 1000) == (16, 16)
    with pytest.raises(APIError, match="over the limit"):
        check_header(_png(), "x", 100)
    with pytest.raises(APIError, match="format"):
        check_header(b"%PDF-1.4 not an image", "x", 10**6)
    assert decode_data_url("data:image/png;base64," + __import__("base64").b64encode(_png()).decode(), "x", 10**6) \
        == _png()


def _fetch_video(url, handler, **policy):
    async def go():
        fetcher = MediaFetcher(MediaPolicy(**policy), resolver=_resolver, transport=httpx.MockTransport(handler))
        try:
            return await fetcher.load_video(url, "video")
        finally:
            await fetcher.aclose()
    return asyncio.run(go())


def test_video_urls_are_fetched_like_images_with_their_own_cap():
    clip = b"\x00\x00\x00\x18ftypmp42" + b"x" * 3000            # bytes only: inputs/video.py decodes them
    assert _fetch_video("http://public.example/v.mp4", lambda r: httpx.Response(200, content=clip)) == clip
    with pytest.raises(APIError, match="byte limit"):
        _fetch_video("http://public.example/v.mp4", lambda r: httpx.Response(200, content=clip), max_video_bytes=1000)
    with pytest.raises(APIError, match="allow-private-urls"):
        _fetch_video("http://evil.example/v.mp4", lambda r: httpx.Response(200, content=clip))
    encoded = __import__("base64").b64encode(clip).decode()
    assert _fetch_video("data:video/mp4;base64," + encoded, None) == clip
    for src, needle in [("data:image/png;base64," + encoded, "not a video"), ("/srv/v.mp4", "not a URL"),
                        ("file:///srv/v.mp4", "disabled"), ("rtsp://cam/stream", "scheme")]:
        with pytest.raises(APIError, match=needle):
            _fetch_video(src, None)
    with pytest.raises(APIError, match="byte limit"):
        _fetch_video("data:video/mp4;base64," + encoded, None, max_video_bytes=100)


class _LocalHTTP:
    """A raw loopback HTTP server: `respond(conn)` writes each answer by hand (slow bodies, redirects)."""

    def __init__(self, respond):
        self.respond = respond
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.hits += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        with conn:
            conn.recv(65536)
            try:
                self.respond(conn)
            except OSError:            # the fetcher gave up and closed the connection
                pass

    def close(self):
        self.sock.close()


def _trickle(conn):
    """A host that sends one byte every 0.1 s: never idle long enough for a read timeout."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n")
    for _ in range(200):
        conn.sendall(b"x")
        time.sleep(0.1)


def _image_chat(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "what is it?"}]}]}


def test_fetch_has_a_total_deadline_through_the_server():
    slow = _LocalHTTP(_trickle)
    settings = ServerSettings(allow_private_urls=True, fetch_total_timeout_s=0.6)
    try:
        with run_server(create_app(FakeAsyncEngine(), settings)) as url:
            t0 = time.time()
            r = httpx.post(url + "/v1/chat/completions", json=_image_chat(f"http://127.0.0.1:{slow.port}/a.png"),
                           timeout=30)
            took = time.time() - t0
    finally:
        slow.close()
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "0.6 s" in err["message"] and err["param"] and err["param"] in err["message"]
    assert took < 5


@pytest.mark.parametrize("target, reason", [
    ("http://169.254.169.254/latest/meta-data/", "link-local"), ("http://[fe80::1]/x.png", "link-local"),
    ("http://100.100.100.200/latest/meta-data/", "cloud metadata"),
    ("http://[fd00:ec2::254]/latest/meta-data/", "cloud metadata"),
    ("http://[::ffff:169.254.169.254]/", "link-local")])
def test_allow_private_urls_still_refuses_link_local_and_metadata_on_every_hop(target, reason):
    def redirect(conn):
        conn.sendall(f"HTTP/1.1 302 Found\r\nLocation: {target}\r\nContent-Length: 0\r\n\r\n".encode())
    hop = _LocalHTTP(redirect)
    # The forbidden hop is refused before any connection, so no timeout is reached when the check holds; the
    # loopback hop's own connect gets the default 5 s because a busy 2-core CI box once took over 0.5 s.
    settings = ServerSettings(allow_private_urls=True)
    try:
        with run_server(create_app(FakeAsyncEngine(), settings)) as url:
            r = httpx.post(url + "/v1/chat/completions", json=_image_chat(f"http://127.0.0.1:{hop.port}/cat.png"))
    finally:
        hop.close()
    assert hop.hits == 1                                   # the loopback hop itself is allowed
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "forbidden_url" and reason in err["message"], err


@pytest.mark.parametrize("address, reason", [
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("100.100.100.200", "cloud metadata"),
    ("fd00:ec2::254", "cloud metadata"), ("::ffff:169.254.1.1", "link-local"),
    ("127.0.0.1", None), ("10.0.0.5", None), ("100.100.100.201", None), ("93.184.216.34", None)])
def test_always_forbidden_addresses(address, reason):
    assert always_forbidden_reason(address) == reason


def _noisy_png(side: int) -> bytes:
    """A PNG that does not compress: its data URL is well past OFF_LOOP_DATA_URL_CHARS."""
    import numpy as np
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_a_large_data_url_decodes_off_the_event_loop_to_the_same_bytes_and_errors(monkeypatch):
    import base64

    from qwenvl.server import media
    png = _noisy_png(200)
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    assert len(url) > media.OFF_LOOP_DATA_URL_CHARS
    loop_thread = []

    async def go(source):
        loop_thread.append(threading.get_ident())
        fetcher = MediaFetcher(MediaPolicy(), resolver=_resolver, transport=httpx.MockTransport(lambda r: None))
        try:
            return await fetcher.load(source, "messages[0].content[0]")
        finally:
            await fetcher.aclose()

    decoded_on = []
    real = media.decode_data_url

    def spy(*args):
        decoded_on.append(threading.get_ident())
        return real(*args)

    monkeypatch.setattr(media, "decode_data_url", spy)
    assert asyncio.run(go(url)) == png
    assert decoded_on[-1] != loop_thread[-1]                       # a worker thread did the decoding
    small = "data:image/png;base64," + base64.b64encode(_png()).decode()
    assert asyncio.run(go(small)) == _png()
    assert decoded_on[-1] == loop_thread[-1]                       # a short one inline
    with pytest.raises(APIError) as e:
        asyncio.run(go(url[:-5] + "!!!!!"))
    assert e.value.status == 400 and "does not decode" in str(e.value)
