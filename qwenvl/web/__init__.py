"""The web demo: a Gradio chat mounted at `/` of `qwenvl serve`, next to the HTTP APIs.

`mount_ui(app)` is the server's hook (qwenvl.server.cli picks it up). Gradio is optional: without it the
APIs still serve and `/` says how to get the UI.
"""

from __future__ import annotations

import logging

log = logging.getLogger("qwenvl.web")


def mount_ui(app) -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        log.warning("web UI disabled: gradio is not installed (pip install 'qwenvl[serve]')")
        return
    from .app import mount

    mount(app)


__all__ = ["mount_ui"]
