"""One engine replica as Ray Serve runs it: a full LLMEngine behind an AsyncEngine, in its own Ray actor.

Plain class (no Ray import here): `replicas.deploy` wraps it with `serve.deployment`. Every replica is built
by `engine_factory.build_engine` from the same settings and engine options as a single-process `qwenvl serve`, so each
engine flag reaches each replica unchanged.
"""

from __future__ import annotations

import os

from .engine_factory import build_engine
from .settings import ServerSettings


class EngineReplica:
    def __init__(self, settings: ServerSettings, engine_options: dict):
        self.engine = build_engine(settings, engine_options)

    def info(self):
        return self.engine.info()

    async def prepare(self, messages, chat_template_kwargs: dict | None = None, tools: list[dict] | None = None):
        return await self.engine.prepare(messages, chat_template_kwargs, tools)

    async def generate(self, prompt, params, request_id: str):
        """Streamed back to the front; if the front cancels the stream, the inner generator's exit aborts the
        request here and frees its KV blocks."""
        async for out in self.engine.generate(prompt, params, request_id):
            yield out

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def stats(self) -> dict:
        return dict(self.engine.stats(), pid=os.getpid())

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising makes it replace the replica."""
        if not self.engine.alive:
            raise RuntimeError("the engine thread has stopped")
