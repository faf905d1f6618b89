"""Load one image from any source a user can hand us, as an upright 8-bit RGB PIL image.

Sources: a local path (str or pathlib.Path), a `file://` URL, a `data:image/...;base64,` URL, a PIL image,
raw bytes. http(s) URLs are fetched by the HTTP server's fetcher (size and host limits live there), never here.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.parse
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

# Smallest side we accept: smart_resize would blow a 1-pixel image up without any content to show.
MIN_SIDE = 4
# Qwen's smart_resize rejects anything longer than 200:1; say so at load time, naming the source.
MAX_ASPECT_RATIO = 200
# Decompression bombs: PIL warns at ~89 MP; a 16k x 16k image (256 MP) is the most we open.
Image.MAX_IMAGE_PIXELS = 16384 * 16384


def load_image(source) -> Image.Image:
    """Return `source` as an RGB PIL image with its EXIF orientation applied; raise InputError otherwise."""
    name = _describe(source)
    if isinstance(source, Image.Image):
        image = source
    else:
        data = _read_bytes(source, name)
        try:
            image = Image.open(io.BytesIO(data))
            image.load()    # decode now, so a truncated file fails here and not inside the resize
        except UnidentifiedImageError:
            raise InputError(f"{name}: not an image format we can decode (PNG, JPEG, WebP, GIF, BMP, TIFF "
                             "are supported); check the file or URL") from None
        except Image.DecompressionBombError as e:
            raise InputError(f"{name}: image too large to open ({e}); send a smaller image") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise InputError(f"{name}: could not decode the image ({e}); the file may be truncated or corrupt") \
                from None
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - broken EXIF must not make an otherwise good image unusable
        pass
    image = to_rgb(image, name)
    _check_shape(image, name)
    return image


def to_rgb(image: Image.Image, name: str = "image") -> Image.Image:
    """8-bit RGB, transparency composited on white (what users see in a viewer, not PIL's black)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit greyscale: PIL's convert("L") clips to 0..255, which turns most 16-bit scans white.
        # Scale by the type's range instead (a 16-bit PNG is 0..65535).
        arr = np.asarray(image, dtype=np.float64)
        peak = float(arr.max(initial=0))
        if mode.startswith("I;16") or (mode == "I" and peak > 255):
            top = 65535.0
        elif mode == "F" and peak <= 1.0:
            top = 1.0       # float images in 0..1
        else:
            top = 255.0
        arr = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")   # L, 1, P, CMYK, YCbCr, LAB, HSV
    except (ValueError, OSError) as e:
        raise InputError(f"{name}: unsupported image mode {mode!r} ({e}); convert it to RGB first") from None


def _check_shape(image: Image.Image, name: str) -> None:
    w, h = image.size
    if min(w, h) < MIN_SIDE:
        raise InputError(f"{name}: image too small ({w}x{h} pixels); each side must be at least {MIN_SIDE} "
                         "pixels")
    if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise InputError(f"{name}: aspect ratio {max(w, h) / min(w, h):.1f} ({w}x{h}) is over "
                         f"{MAX_ASPECT_RATIO}; crop or pad the image")


def read_source(source, name: str, media: str = "image") -> bytes:
    """The bytes of a local source (path, file:// or data: URL, bytes); `media` is the data URL type expected
    ("image" for image/..., "pdf" for application/pdf)."""
    return _read_bytes(source, name, media)


def _read_bytes(source, name: str, media: str = "image") -> bytes:
    src = local_source(source, name, media)
    return src if isinstance(src, bytes) else src.read_bytes()


# What a source of each kind may be (named when one is of an unsupported type), and its word in messages.
_SOURCE_HINTS = {"image": ("a path, a file:// or data: URL, bytes or a PIL image", "an image"),
                 "video": ("a path, a file:// or data:video/... URL, bytes, or a list of frames", "a video"),
                 "pdf": ("a path, a file:// or data:application/pdf URL, or bytes", "a PDF")}


def local_source(source, name: str, kind: str = "image") -> bytes | Path:
    """A local media source as bytes (given, or a data: URL's payload) or the checked Path of a file (the
    caller reads it whole or streams it); http(s) URLs are the HTTP server's fetcher's, never read here."""
    hint, article = _SOURCE_HINTS[kind]
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, Path):
        return _checked_file(source, article)
    if not isinstance(source, str):
        raise InputError(f"unsupported {kind} source of type {type(source).__name__}; pass {hint}")
    lower = source[:16].lower()
    if lower.startswith(("http://", "https://")):
        raise InputError(f"{name}: http(s) {kind} URLs are fetched by the HTTP server, not here; download the "
                         "file first or pass a path, file:// or data: URL")
    if lower.startswith("data:"):
        return _decode_data_url(source, name, kind)
    if lower.startswith("file:"):
        parsed = urllib.parse.urlparse(source)
        # file:///abs/path and file://localhost/abs/path are local; file://relative/path is read as written.
        host = "" if parsed.netloc in ("", "localhost") else parsed.netloc
        return _checked_file(Path(urllib.parse.unquote(host + parsed.path)), article)
    if "://" in source[:12]:
        scheme = source.split("://", 1)[0]
        raise InputError(f"{name}: unsupported URL scheme {scheme!r}; use http(s)://, file:// or data:")
    return _checked_file(Path(source), article)


def _checked_file(path: Path, article: str) -> Path:
    if not path.exists():
        raise InputError(f"{article.split()[-1]} file not found: {path}; check the path")
    if not path.is_file():
        raise InputError(f"{path} is not a file; pass the path of {article} file")
    return path


# kind -> (accepted media type prefixes, what it is called, the type to name in errors)
_DATA_TYPES = {"image": (("image/",), "an image", "image/..."),
               "video": (("video/", "application/octet-stream"), "a video", "video/..."),
               "pdf": (("application/pdf",), "a PDF", "application/pdf")}


def _decode_data_url(url: str, name: str, kind: str = "image") -> bytes:
    # data:[<mediatype>][;base64],<data>
    prefix, what, expected = _DATA_TYPES[kind]
    example = "image/png" if kind == "image" else "video/mp4" if kind == "video" else expected
    head, sep, payload = url.partition(",")
    if not sep:
        raise InputError(f"{name}: malformed data URL (no comma); expected data:{example};base64,<data>")
    media = head[5:].split(";")
    if media[0] and not media[0].lower().startswith(prefix):
        raise InputError(f"{name}: data URL media type {media[0]!r} is not {what}; expected {expected}")
    if "base64" not in (m.lower() for m in media[1:]):
        return urllib.parse.unquote_to_bytes(payload)
    try:
        # a video is decoded strictly: a damaged payload is refused, not decoded around
        return base64.b64decode("".join(payload.split()), validate=kind == "video")
    except (binascii.Error, ValueError):
        raise InputError(f"{name}: the data URL's base64 payload does not decode") from None


def _describe(source) -> str:
    """A short name for error messages (never a whole base64 payload)."""
    if isinstance(source, Image.Image):
        return f"PIL image {source.mode} {source.size[0]}x{source.size[1]}"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"image bytes ({len(source)} bytes)"
    if isinstance(source, str) and source[:5].lower() == "data:":
        return f"data URL ({source[:30]}...)"
    return str(source)
