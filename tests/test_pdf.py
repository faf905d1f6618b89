"""PDF pages as images (issue 26 part 2): page choice, order, size limit, refusal before rendering."""

from __future__ import annotations

import io

import pypdfium2 as pdfium
import pytest

from qwenvl.inputs.errors import InputError
from qwenvl.inputs.pdf import PdfError, PdfLimits, parse_pages, render_pdf

# (width, height) in points; distinct aspect ratios let the tests see page order in the images
SIZES = [(612, 792), (792, 612), (300, 900), (900, 300), (500, 500)]


def make_pdf(sizes=SIZES) -> bytes:
    doc = pdfium.PdfDocument.new()
    for w, h in sizes:
        doc.new_page(w, h)
    out = io.BytesIO()
    doc.save(out)
    return out.getvalue()


def aspect(size) -> float:
    return size[0] / size[1]


def test_pages_render_in_order_within_max_pixels():
    for max_pixels in (50_000, 200_000, 28 * 28 * 1280):
        images = render_pdf(make_pdf(), "doc.pdf", limits=PdfLimits(max_pixels=max_pixels))
        assert len(images) == len(SIZES)
        for image, (w, h) in zip(images, SIZES):
            assert image.mode == "RGB"
            assert abs(aspect(image.size) - w / h) < 0.02
            assert 0.97 * max_pixels <= image.size[0] * image.size[1] <= max_pixels


def test_a_page_range_picks_those_pages():
    images = render_pdf(make_pdf(), "doc.pdf", pages="2-3,5", limits=PdfLimits(max_pixels=50_000))
    assert [round(aspect(i.size), 1) for i in images] == [round(792 / 612, 1), round(300 / 900, 1), 1.0]
    assert parse_pages("1-3", 5) == [0, 1, 2] and parse_pages(4, 5) == [3] and parse_pages([1, 5], 5) == [0, 4]
    for bad in ("0", "4-2", "6", "1-x", "", "-2"):
        with pytest.raises(PdfError, match="pages"):
            parse_pages(bad, 5)


def test_too_many_pages_is_refused_before_rendering(monkeypatch):
    data = make_pdf([(100, 100)] * 40)
    rendered = []
    monkeypatch.setattr(pdfium.PdfPage, "render", lambda *a, **k: rendered.append(1))
    with pytest.raises(PdfError, match="40 pages selected, more than the limit of 32"):
        render_pdf(data, "long.pdf")
    assert rendered == []


def test_corrupt_and_non_pdf_inputs_are_input_errors():
    data = make_pdf()
    for bad, why in ((b"hello, not a pdf", "not a PDF"), (b"%PDF-1.7 garbage", "cannot open"),
                     (data[: len(data) // 3], "cannot open")):
        with pytest.raises(InputError, match=why) as err:
            render_pdf(bad, "broken.pdf")
        assert "broken.pdf" in str(err.value)


def test_cli_chat_reads_a_pdf_and_its_pages(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    report = tmp_path / "report.pdf"
    report.write_bytes(make_pdf())
    run = [sys.executable, "-m", "qwenvl", "chat", "--device", "cpu", "--max-tokens", "4", "--image", str(report)]
    out = subprocess.run([*run, "--pages", "1-2", "What is on these pages?"], capture_output=True, text=True,
                         timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() != ""
    out = subprocess.run([*run, "--pages", "7", "What is on this page?"], capture_output=True, text=True,
                         timeout=300, cwd=root)
    assert out.returncode == 2 and "outside 1-5" in out.stderr and "Traceback" not in out.stderr


def test_cli_pages_picks_one_page_and_needs_a_pdf(tmp_path):
    """One page of one PDF is one image, as many as --image gave: still a PDF's page, not "no PDF given"."""
    from qwenvl.cli.main import _expand_pdfs
    report = tmp_path / "report.pdf"
    report.write_bytes(make_pdf())
    (page,) = _expand_pdfs([str(report)], "4", max_pixels=50_000)
    assert aspect(page.size) == pytest.approx(aspect(SIZES[3]), rel=0.05)
    assert len(_expand_pdfs([str(report), "a.png"], "2", max_pixels=50_000)) == 2
    with pytest.raises(ValueError, match="--pages applies to a PDF"):
        _expand_pdfs(["a.png"], "1", max_pixels=50_000)


def test_a_pdf_in_a_message_becomes_its_pages(tmp_path):
    """LLM.chat: a `.pdf` path or data:application/pdf where an image goes; `pages` picks them."""
    import base64

    from qwenvl.llm import LLM

    path = tmp_path / "report.pdf"
    path.write_bytes(make_pdf())
    llm = LLM(device="cpu")
    url = "data:application/pdf;base64," + base64.b64encode(make_pdf()).decode()
    prompts = {name: llm.engine.prepare([{"role": "user", "content": [part, {"text": "Summarise."}]}])
               for name, part in [("all", {"image": str(path)}), ("two", {"image": url, "pages": "2-3"}),
                                  ("one", {"type": "image_url", "image_url": {"url": url}, "pages": 5})]}
    assert [len(prompts[k].vision) for k in ("all", "two", "one")] == [5, 2, 1]
    assert [aspect(v.original_size) > 1 for v in prompts["two"].vision] == [True, False]     # pages 2 and 3
    with pytest.raises(InputError, match="outside 1-5"):
        llm.engine.prepare([{"role": "user", "content": [{"image": str(path), "pages": "4-9"}]}])


def test_the_server_renders_a_pdf_sent_in_a_message(tmp_path):
    import asyncio
    import base64

    import httpx
    import openai
    from test_server_fake_engine import DS_PATH, run_server

    from qwenvl.engine.async_engine import AsyncEngine
    from qwenvl.engine.llm_engine import LLMEngine
    from qwenvl.server.app import create_app
    from qwenvl.server.settings import ServerSettings

    engine = AsyncEngine(LLMEngine(None, device="cpu"), max_queue=4)
    url = "data:application/pdf;base64," + base64.b64encode(make_pdf()).decode()
    try:
        with run_server(create_app(engine, ServerSettings(max_images=3, served_model_name="qwenvl-test"))) as base:
            client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
            msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}, "pages": "1,3"},
                                                 {"type": "text", "text": "What is in it?"}]}]
            r = client.chat.completions.create(model="qwenvl-test", messages=msgs, max_tokens=2)
            one = client.chat.completions.create(model="qwenvl-test", max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}, "pages": "1"}, {"type": "text", "text": "What is in it?"}]}])
            images = [x.usage.model_dump()["prompt_tokens_details"]["image_tokens"] for x in (r, one)]
            assert images[0] > images[1] > 0
            ds = httpx.post(base + DS_PATH, json={"input": {"messages": [{"role": "user", "content": [
                {"image": url, "pages": "2"}, {"text": "Read it."}]}]}, "parameters": {"max_tokens": 2}})
            assert ds.status_code == 200, ds.text
            too_many = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}]}]})
            assert too_many.status_code == 400 and "5 pages selected, more than the limit of 3" in too_many.text
            broken = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:application/pdf;base64," +
                                                    base64.b64encode(b"%PDF-1.4 broken").decode()}}]}]})
            assert broken.status_code == 400 and "cannot open the PDF" in broken.text
    finally:
        asyncio.run(engine.shutdown(grace_s=1))
