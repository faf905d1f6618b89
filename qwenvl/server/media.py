"""Fetch the images and video files of a request in the server, safely, and hand bytes to the input pipeline.

- `data:` URLs are decoded here (payload size capped).
- http(s) URLs: the host is resolved once, every address is checked (loopback, private, link-local,
  multicast, reserved and unspecified addresses are refused unless `allow_private_urls`; link-local and
  cloud metadata addresses even with it), and the connection goes to that checked address (the Host
  header and TLS SNI keep the name), so a DNS answer that changes between the check and the connect
  (DNS rebinding) cannot reach a forbidden host. Redirects are followed by hand, each hop checked the
  same way; connect/read timeouts and a total deadline per URL; a byte cap.
- `file://` URLs only under `allowed_local_media_path`; bare local paths are refused (the Python API and
  CLI accept them, an HTTP client must not read the server's disk).
Every image's header is read (PIL's Image.open decodes nothing) to refuse unknown formats and images with
too many pixels before anything is decoded. Video files get the same fetching with their own byte cap; the
input pipeline (inputs/video.py) checks the container, codec and frame size before it decodes a frame.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image, UnidentifiedImageError

from ..inputs.pdf import is_pdf
from .errors import APIError, bad_request

FORMATS = {"PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF"}
# A data URL longer than this is decoded in a worker thread: a 1280x720 PNG's ~1.5 MB of base64 held the event
# loop (and so every other request's token stream) for milliseconds; base64 and the whitespace strip are 5% of
# the loop's GIL time at 32 streaming clients (py-spy). Short ones are cheaper inline than a thread hop.
OFF_LOOP_DATA_URL_CHARS = 64 * 1024


@dataclass(frozen=True)
class MediaPolicy:
    allowed_local_media_path: str | None = None
    allow_private_urls: bool = False
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0
    total_timeout_s: float = 30.0         # the whole fetch: a host sending a byte a second never hits read_timeout
    max_bytes: int = 20 * 1024 * 1024
    max_video_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 8192 * 8192
    max_redirects: int = 3


def describe(source: str) -> str:
    """A short name for messages: never a whole base64 payload."""
    return source[:40] + "..." if source[:5].lower() == "data:" else source[:200]


class MediaFetcher:
    """One per app: holds the HTTP client (no proxies from the environment: they would bypass the checks)."""

    def __init__(self, policy: MediaPolicy, resolver=None, transport: httpx.AsyncBaseTransport | None = None):
        self.policy = policy
        self._resolve = resolver or _resolve           # tests stub DNS and the network
        self._client = httpx.AsyncClient(
            follow_redirects=False, trust_env=False, transport=transport,
            timeout=httpx.Timeout(policy.read_timeout_s, connect=policy.connect_timeout_s))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def load(self, source, where: str, uploads=None) -> bytes:
        """Image source as sent by a client -> checked image bytes; raises APIError(400) naming `where`.
        `uploads` (server/uploads.py's UploadReader) reads `oss://` URLs, for requests that opt in to them."""
        if not isinstance(source, str):
            raise bad_request(f"{where}: an image must be a URL string (data:, http(s)://, file://), got "
                              f"{type(source).__name__}", where)
        src = source.strip()
        scheme = src.split(":", 1)[0].lower() if ":" in src[:12] else ""
        if scheme == "data" and len(src) > OFF_LOOP_DATA_URL_CHARS:
            data = await asyncio.to_thread(decode_data_url, src, where, self.policy.max_bytes)
        elif scheme == "data":
            data = decode_data_url(src, where, self.policy.max_bytes)
        elif scheme in ("http", "https"):
            data = await self.fetch(src, where)
        elif scheme == "file":
            data = self.read_local(src, where)
        elif scheme == "oss":
            data = await _read_upload(uploads, src, where, "image", self.policy.max_bytes)
        elif scheme:
            raise bad_request(f"{where}: unsupported URL scheme {scheme!r}; use data:, http(s):// or file://", where)
        else:
            raise bad_request(f"{where}: {describe(src)!r} is not a URL; send a data: URL, an http(s):// URL, "
                              "or a file:// URL under the server's --allowed-local-media-path", where)
        check_header(data, where, self.policy.max_pixels)
        return data

    async def load_video(self, source, where: str, uploads=None) -> bytes:
        """Video file source (data:video/..., http(s)://, file://, oss://) -> its bytes, under max_video_bytes."""
        return await self._load_file(source, where, "video", "data:video/... URL", uploads)

    async def load_document(self, source, where: str, uploads=None) -> bytes:
        """PDF source (data:application/pdf, http(s)://, file://, oss://) -> its bytes, under max_video_bytes
        (the cap of every file that is not an image)."""
        data = await self._load_file(source, where, "application", "data:application/pdf URL", uploads)
        if not is_pdf(data):
            raise bad_request(f"{where}: not a PDF (no %PDF- header)", where)
        return data

    async def _load_file(self, source, where: str, data_kind: str, data_example: str, uploads) -> bytes:
        if not isinstance(source, str):
            raise bad_request(f"{where}: must be a URL string (data:, http(s)://, file://), got "
                              f"{type(source).__name__}", where)
        src = source.strip()
        scheme = src.split(":", 1)[0].lower() if ":" in src[:12] else ""
        cap = self.policy.max_video_bytes
        if scheme == "data":
            return decode_data_url(src, where, cap, kind=data_kind)
        if scheme in ("http", "https"):
            return await self.fetch(src, where, cap)
        if scheme == "file":
            return self.read_local(src, where, cap)
        if scheme == "oss":
            return await _read_upload(uploads, src, where, "video" if data_kind == "video" else "pdf", cap)
        if scheme:
            raise bad_request(f"{where}: unsupported URL scheme {scheme!r}; use data:, http(s):// or file://", where)
        raise bad_request(f"{where}: {describe(src)!r} is not a URL; send a {data_example}, an http(s):// URL, "
                          "or a file:// URL under the server's --allowed-local-media-path", where)

    # ------------------------------------------------------------------ file://
    def read_local(self, url: str, where: str, cap: int | None = None) -> bytes:
        root = self.policy.allowed_local_media_path
        if not root:
            raise bad_request(f"{where}: file:// URLs are disabled on this server (start it with "
                              "--allowed-local-media-path DIR to allow files under DIR)", where)
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise bad_request(f"{where}: file:// URL with a remote host {parsed.netloc!r}", where)
        path = Path(urllib.parse.unquote(parsed.path)).resolve()     # follows symlinks and ".."
        base = Path(root).resolve()
        if not path.is_relative_to(base):
            raise bad_request(f"{where}: {path} is outside the allowed local media folder", where)
        if not path.is_file():
            raise bad_request(f"{where}: no such file under the allowed local media folder: {path}", where)
        cap = cap or self.policy.max_bytes
        if path.stat().st_size > cap:
            raise bad_request(f"{where}: file is larger than {cap} bytes", where)
        return path.read_bytes()

    # ------------------------------------------------------------------ http(s)
    async def fetch(self, url: str, where: str, cap: int | None = None) -> bytes:
        """The body of an http(s) URL, redirects followed and checked, within the total deadline."""
        limit = self.policy.total_timeout_s
        try:
            async with asyncio.timeout(limit):
                return await self._fetch(url, where, cap)
        except TimeoutError:
            raise bad_request(f"{where}: fetching {describe(url)} took longer than the server's {limit:g} s limit "
                              "per media URL (fetch_total_timeout_s); send a smaller file or a faster host",
                              where) from None

    async def _fetch(self, url: str, where: str, cap: int | None) -> bytes:
        for _ in range(self.policy.max_redirects + 1):
            parsed = urllib.parse.urlsplit(url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise bad_request(f"{where}: cannot fetch {describe(url)!r}: only http(s) URLs with a host", where)
            if parsed.username or parsed.password:
                raise bad_request(f"{where}: credentials in media URLs are not accepted", where)
            host = parsed.hostname
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            address = await self._checked_address(host, port, where)
            ip_host = f"[{address}]" if ":" in address else address
            target = urllib.parse.urlunsplit((parsed.scheme, f"{ip_host}:{port}", parsed.path or "/",
                                              parsed.query, ""))
            netloc = host if parsed.port is None else f"{host}:{parsed.port}"
            extensions = {"sni_hostname": host} if parsed.scheme == "https" else {}
            try:
                request = self._client.build_request("GET", target, headers={"Host": netloc},
                                                     extensions=extensions)
                response = await self._client.send(request, stream=True)
            except httpx.TimeoutException:
                raise bad_request(f"{where}: timed out fetching {describe(url)}", where) from None
            except httpx.HTTPError as e:
                raise bad_request(f"{where}: could not fetch {describe(url)} ({type(e).__name__})", where) from None
            try:
                if response.status_code in (301, 302, 303, 307, 308):
                    location = response.headers.get("location")
                    if not location:
                        raise bad_request(f"{where}: {describe(url)} redirects without a Location", where)
                    url = urllib.parse.urljoin(url, location)
                    continue
                if response.status_code != 200:
                    raise bad_request(f"{where}: fetching {describe(url)} answered HTTP {response.status_code}", where)
                return await self._read_capped(response, url, where, cap or self.policy.max_bytes)
            finally:
                await response.aclose()
        raise bad_request(f"{where}: more than {self.policy.max_redirects} redirects fetching {describe(url)}", where)

    async def _read_capped(self, response: httpx.Response, url: str, where: str, cap: int) -> bytes:
        length = response.headers.get("content-length")
        if length and length.isdigit() and int(length) > cap:
            raise bad_request(f"{where}: {describe(url)} is {length} bytes, over the {cap}-byte limit", where)
        chunks, total = [], 0
        try:
            async for chunk in response.aiter_bytes():
                total += len(chunk)
                if total > cap:
                    raise bad_request(f"{where}: {describe(url)} is over the {cap}-byte limit", where)
                chunks.append(chunk)
        except httpx.TimeoutException:
            raise bad_request(f"{where}: timed out reading {describe(url)}", where) from None
        except httpx.HTTPError as e:
            raise bad_request(f"{where}: error reading {describe(url)} ({type(e).__name__})", where) from None
        return b"".join(chunks)

    async def _checked_address(self, host: str, port: int, where: str) -> str:
        try:
            addresses = await self._resolve(host, port)
        except OSError:
            raise bad_request(f"{where}: cannot resolve host {host!r}", where) from None
        if not addresses:
            raise bad_request(f"{where}: host {host!r} has no address", where)
        for a in addresses:
            if reason := always_forbidden_reason(a):
                why = "the server never fetches such addresses, not even with --allow-private-urls"
            elif not self.policy.allow_private_urls and (reason := forbidden_reason(a)):
                why = "the server refuses such URLs (start it with --allow-private-urls to allow them)"
            else:
                continue
            raise APIError(400, f"{where}: host {host!r} resolves to a {reason} address ({a}); {why}",
                           param=where, code="forbidden_url")
        return addresses[0]


async def _read_upload(uploads, url: str, where: str, want: str, cap: int) -> bytes:
    """An `oss://` URL: a file the dashscope SDK uploaded to this server (server/uploads.py)."""
    if uploads is None:
        raise bad_request(f"{where}: oss:// URLs are read only for requests with the header "
                          "'X-DashScope-OssResourceResolve: enable' (the dashscope SDK sends it with the files it "
                          "uploaded to this server)", where)
    return await uploads.read(url, where, want, cap)


async def _resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for info in infos:
        addr = info[4][0].split("%", 1)[0]       # drop an IPv6 zone id
        if addr not in seen:
            seen.append(addr)
    return seen


# Cloud metadata services outside link-local space: Alibaba Cloud's, and AWS's IPv6 endpoint.
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in ("100.100.100.200", "fd00:ec2::254"))


def _unmapped(address: str):
    """The address, with an IPv4-mapped or 6to4 IPv6 address read as the IPv4 address it carries."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return mapped
    return ip


def always_forbidden_reason(address: str) -> str | None:
    """Why an address is refused even with allow_private_urls (credentials live there), or None."""
    ip = _unmapped(address)
    if ip.is_link_local:                 # 169.254.0.0/16 (169.254.169.254 and friends), fe80::/10
        return "link-local"
    if ip in METADATA_ADDRESSES:
        return "cloud metadata"
    return None


def forbidden_reason(address: str) -> str | None:
    """Why an address must not be fetched by default, or None when it is a public unicast address."""
    ip = _unmapped(address)
    for attr, reason in (("is_loopback", "loopback"), ("is_link_local", "link-local"),
                         ("is_multicast", "multicast"), ("is_unspecified", "unspecified"),
                         ("is_reserved", "reserved"), ("is_private", "private")):
        if getattr(ip, attr):
            return reason
    if not ip.is_global:
        return "non-global"      # shared address space (100.64/10) and the like
    return None


def decode_data_url(url: str, where: str, max_bytes: int, kind: str = "image") -> bytes:
    """kind "image" wants data:image/..., "video" wants data:video/... (or a typeless data: URL)."""
    head, sep, payload = url.partition(",")
    example = {"image": "image/png", "video": "video/mp4"}.get(kind, "application/pdf")
    if not sep:
        raise bad_request(f"{where}: malformed data URL (no comma); expected data:{example};base64,<data>", where)
    media = head[5:].split(";")
    if media[0] and not media[0].lower().startswith(f"{kind}/"):
        raise bad_request(f"{where}: data URL media type {media[0]!r} is not {'an' if kind == 'image' else 'a'} "
                          f"{kind}; expected {kind}/...", where)
    if len(payload) > max_bytes * 4 // 3 + 8:
        raise bad_request(f"{where}: data URL payload is over the {max_bytes}-byte limit", where)
    if "base64" not in (m.lower() for m in media[1:]):
        return urllib.parse.unquote_to_bytes(payload)
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where}: the data URL's base64 payload does not decode", where) from None


def check_header(data: bytes, where: str, max_pixels: int) -> tuple[int, int]:
    """Read only the image header: refuse unknown formats and too many pixels before any decoding."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (w, h) = im.format, im.size
    except UnidentifiedImageError:
        raise bad_request(f"{where}: unsupported or unrecognised image format; send PNG, JPEG, WebP, GIF, BMP "
                          "or TIFF", where) from None
    except Image.DecompressionBombError:
        raise bad_request(f"{where}: image has too many pixels (over {max_pixels}); send a smaller image",
                          where) from None
    except Exception as e:  # noqa: BLE001 - a corrupt header is the client's problem, never a 500
        raise bad_request(f"{where}: cannot read the image header ({type(e).__name__}); the file may be "
                          "corrupt", where) from None
    if fmt not in FORMATS:
        raise bad_request(f"{where}: image format {fmt} is not supported; send PNG, JPEG, WebP, GIF, BMP or TIFF",
                          where)
    if w * h > max_pixels:
        raise bad_request(f"{where}: image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} pixels; "
                          "send a smaller image", where)
    return w, h
