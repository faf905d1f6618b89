"""The engine a server process runs: one LLMEngine behind an AsyncEngine, built from the server's settings and
engine options. Its own module so that `qwenvl serve` and each Ray replica (replica_worker.py) build it the same
way without importing each other."""

from __future__ import annotations

from .settings import ServerSettings


def build_engine(settings: ServerSettings, engine_options: dict | None = None):
    from ..engine.async_engine import AsyncEngine
    from ..engine.llm_engine import EngineConfig, LLMEngine

    engine = LLMEngine(settings.model, dtype=settings.dtype, device=settings.device,
                       config=EngineConfig(**(engine_options or {})), revision=settings.revision)
    return AsyncEngine(engine, max_queue=settings.max_queue, grammar_timeout_s=settings.grammar_compile_timeout_s)
