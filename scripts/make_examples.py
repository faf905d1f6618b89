"""Writes the small example files the README's commands use, beside the older hand-made ones:

    examples/table.png     a synthetic table (the `table` task's scene) for `qwenvl ocr --task table_parsing`
    examples/invoice.png   a plain invoice for `qwenvl ocr --task key_information_extraction`
    examples/report.pdf    three pages (shapes.png, chart.png, table.png) for `qwenvl chat --image report.pdf --pages`
    examples/clip.mp4      two seconds of a red circle crossing the frame, for `qwenvl chat --video`

    .venv/bin/python scripts/make_examples.py

Each file stays far under 100 KB. examples/chart.png and word.png are drawn by `python -m qwenvl.web.examples`,
shapes.png is a synthetic scene (qwenvl/synthetic/); examples/train.jsonl and predictions.jsonl are written
by hand.
"""

import random
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwenvl.synthetic.charts import table_scene  # noqa: E402
from qwenvl.synthetic.fonts import latin_fonts, load_font  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def make_table() -> Image.Image:
    img, _rows, _cols, _cells = table_scene(random.Random(9), "heldout")   # seed 9: a 3x4 table filling its canvas
    img.save(EXAMPLES / "table.png", optimize=True)
    return img


def make_invoice() -> None:
    """Dark text on white, the layout of a receipt: a title, three items, the total."""
    img = Image.new("RGB", (360, 260), "white")
    draw = ImageDraw.Draw(img)
    regular = next(f for f in latin_fonts() if f.endswith("DejaVuSans.ttf"))
    title, body = load_font(regular, 22), load_font(regular, 15)
    draw.text((20, 16), "INVOICE  No. 1042", font=title, fill="black")
    draw.text((20, 50), "Date: 2024-03-05", font=body, fill="black")
    lines = [("Paper, A4 (2 boxes)", "24.00"), ("Printer ink", "41.50"), ("Delivery", "21.00")]
    for i, (item, price) in enumerate(lines):
        draw.text((20, 90 + 26 * i), item, font=body, fill="black")
        draw.text((270, 90 + 26 * i), price, font=body, fill="black")
    draw.line((20, 174, 340, 174), fill="black", width=1)
    draw.text((20, 186), "Total due", font=title, fill="black")
    draw.text((250, 186), "86.50", font=title, fill="black")
    img.save(EXAMPLES / "invoice.png", optimize=True)


def make_pdf(table: Image.Image) -> None:
    pages = [Image.open(EXAMPLES / "shapes.png").convert("RGB"), Image.open(EXAMPLES / "chart.png").convert("RGB"),
             table.convert("RGB")]
    when = time.gmtime(1704067200)                          # fixed dates (2024-01-01): the same bytes on every run
    pages[0].save(EXAMPLES / "report.pdf", save_all=True, append_images=pages[1:], resolution=72.0, quality=80,
                  title="qwenvl example report", creationDate=when, modDate=when)


def make_clip(seconds: int = 2, fps: int = 8, size: tuple[int, int] = (224, 128)) -> None:
    import av

    with av.open(str(EXAMPLES / "clip.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = {"crf": "30"}
        for i in range(seconds * fps):
            frame = Image.new("RGB", size, (214, 236, 222))
            x = 20 + (size[0] - 60) * i / (seconds * fps - 1)
            ImageDraw.Draw(frame).ellipse((x, 44, x + 40, 84), fill=(214, 32, 56))
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())


if __name__ == "__main__":
    make_pdf(make_table())
    make_invoice()
    make_clip()
    for name in ("table.png", "invoice.png", "report.pdf", "clip.mp4"):
        print(f"examples/{name}: {(EXAMPLES / name).stat().st_size} bytes")
