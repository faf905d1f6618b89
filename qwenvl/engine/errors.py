"""Errors the engine's public surface raises; front ends catch these by type (light to import: no torch)."""

from __future__ import annotations


class EngineFull(RuntimeError):
    """Too many requests are waiting; the client should retry later (HTTP 503/429, a 'busy' line in the demo)."""


class EngineStopped(RuntimeError):
    """The engine is shutting down: the request was refused or ended before its answer (HTTP 503)."""


class GrammarCompileTimeout(RuntimeError):
    """A request's grammar did not compile by its deadline (HTTP 503): the schema is too complex for the
    deadline, or the compile threads were busy with others."""
