"""load_image: every source kind, every PIL mode to RGB, EXIF orientation, each error."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from qwenvl.inputs import InputError, load_image


def _png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def rgb():
    arr = np.zeros((20, 30, 3), np.uint8)
    arr[..., 0] = 200
    arr[:10, :, 1] = 100
    return Image.fromarray(arr, "RGB")


def test_every_source_kind(tmp_path, rgb):
    data = _png_bytes(rgb)
    path = tmp_path / "a b.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    sources = [str(path), path, path.as_uri(), f"file://{path}", f"file://localhost{path}", f"data:image/png;base64,{b64}",
               f"data:image/png;base64,{b64[:20]}\n{b64[20:]}", rgb, data, bytearray(data)]
    for src in sources:
        img = load_image(src)
        assert img.mode == "RGB" and img.size == (30, 20)
        assert np.array_equal(np.asarray(img), np.asarray(rgb)), src if isinstance(src, str) else type(src)


def test_modes_convert_to_rgb():
    # RGBA: transparent pixels become white, half-transparent red blends with white.
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    rgba.putpixel((2, 2), (255, 0, 0, 128))
    out = np.asarray(load_image(rgba))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[1, 1].tolist() == [255, 0, 0]
    assert out[2, 2, 0] == 255 and 120 <= out[2, 2, 1] <= 135

    la = Image.new("LA", (8, 8), (10, 0))
    assert np.asarray(load_image(la))[0, 0].tolist() == [255, 255, 255]

    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    p.putpixel((0, 0), 1)
    p.info["transparency"] = 0                       # index 0 (blue) is transparent
    out = np.asarray(load_image(Image.open(io.BytesIO(_png_bytes(p)))))
    assert out[0, 0].tolist() == [0, 255, 0] and out[5, 5].tolist() == [255, 255, 255]

    pa = Image.new("PA", (8, 8), (1, 0))
    pa.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    assert np.asarray(load_image(pa))[0, 0].tolist() == [255, 255, 255]

    assert np.asarray(load_image(Image.new("L", (8, 8), 77)))[0, 0].tolist() == [77, 77, 77]
    assert np.asarray(load_image(Image.new("1", (8, 8), 1)))[0, 0].tolist() == [255, 255, 255]
    cmyk = np.asarray(load_image(Image.new("CMYK", (8, 8), (0, 255, 255, 0))))
    assert cmyk[0, 0].tolist() == [255, 0, 0]

    # 16-bit greyscale: full range scaled to 8 bits, not clipped to white.
    arr16 = np.full((8, 8), 32768, np.uint16)
    arr16[0, 0] = 65535
    i16 = Image.fromarray(arr16)
    out = np.asarray(load_image(Image.open(io.BytesIO(_png_bytes(i16)))))
    assert out[0, 0].tolist() == [255] * 3 and out[1, 1, 0] == 128
    out = np.asarray(load_image(i16))
    assert out[0, 0, 0] == 255 and out[1, 1, 0] == 128
    i32 = Image.fromarray(arr16.astype(np.int32))
    assert np.asarray(load_image(i32))[1, 1, 0] == 128
    i8range = Image.fromarray(np.full((8, 8), 200, np.int32))    # an "I" image holding 8-bit values
    assert np.asarray(load_image(i8range))[0, 0, 0] == 200


def test_exif_orientation_applied(rgb):
    exif = Image.Exif()
    exif[0x0112] = 6                                  # rotate 90 degrees clockwise to display
    data = _png_bytes(rgb, "JPEG", exif=exif.tobytes(), quality=95)
    img = load_image(data)
    assert img.size == (20, 30)                       # width and height swapped
    # the top rows of the original (green > 0) end up on the right side
    arr = np.asarray(img).astype(int)
    assert arr[:, -3:, 1].mean() > 80 and arr[:, :3, 1].mean() < 20


def test_errors(tmp_path, rgb):
    with pytest.raises(InputError, match="not found"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(InputError, match="not found"):
        load_image((tmp_path / "missing.png").as_uri())
    with pytest.raises(InputError, match="not a file"):
        load_image(tmp_path)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(InputError, match="bad.png.*not an image format"):
        load_image(str(bad))
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(_png_bytes(rgb)[:60])
    with pytest.raises(InputError, match="trunc.png"):
        load_image(str(trunc))
    with pytest.raises(InputError, match="http"):
        load_image("https://example.com/cat.png")
    with pytest.raises(InputError, match="unsupported URL scheme 'ftp'"):
        load_image("ftp://example.com/cat.png")
    with pytest.raises(InputError, match="not an image"):
        load_image("data:text/plain;base64,aGVsbG8=")
    with pytest.raises(InputError, match="base64"):
        load_image("data:image/png;base64,!!!")
    with pytest.raises(InputError, match="unsupported image source"):
        load_image(12)
    with pytest.raises(InputError, match="too small"):
        load_image(Image.new("RGB", (2, 50)))
    with pytest.raises(InputError, match="aspect ratio"):
        load_image(Image.new("RGB", (4, 1000)))
