"""The web demo's Gradio queue polls the event loop every 50 ms, not Gradio's 1 ms (qwenvl/web/app.py)."""

import pytest

gr = pytest.importorskip("gradio")

from qwenvl.web.app import PROGRESS_POLL_S, QUEUE_POLL_S, calm_queue_polling  # noqa: E402


def test_the_queue_polls_at_our_interval_not_every_millisecond():
    with gr.Blocks() as demo:
        gr.Textbox()
    demo.queue()
    queue = demo._queue          # Gradio's private queue: a release that renames these attributes fails here
    assert queue.sleep_when_free < QUEUE_POLL_S          # Gradio's own default on Linux (1 ms)
    calm_queue_polling(demo)
    assert queue.sleep_when_free == QUEUE_POLL_S
    assert queue.progress_update_sleep_when_free == PROGRESS_POLL_S
