"""The HTTP service: OpenAI- and DashScope-compatible APIs, /health and /metrics (shared/DESIGN.md section 3).

`create_app(async_engine, settings)` builds the FastAPI app; `serve(settings)` runs it under uvicorn with a
SIGTERM drain; `add_serve_subcommand(subparsers)` adds `qwenvl serve`.
"""

from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app", "serve", "add_serve_subcommand"]


def __getattr__(name):
    # Lazy: importing the settings must not pull in FastAPI and uvicorn.
    if name == "create_app":
        from .app import create_app
        return create_app
    if name in ("serve", "add_serve_subcommand"):
        from . import cli
        return getattr(cli, name)
    raise AttributeError(name)
