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
        from fastapi.responses import PlainTextResponse

        async def no_ui():
            return PlainTextResponse("qwenvl: the APIs are up; the web UI needs gradio (pip install gradio) "
                                     "and a restart.\n")
        app.add_api_route("/", no_ui, methods=["GET"], include_in_schema=False)
        return
    from .app import mount

    mount(app)


__all__ = ["mount_ui"]
