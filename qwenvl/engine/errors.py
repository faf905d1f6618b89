"""Errors the engine's public surface raises; front ends catch these by type (light to import: no torch)."""

from __future__ import annotations


class EngineFull(RuntimeError):
    """Too many requests are waiting; the client should retry later (HTTP 503/429, a 'busy' line in the demo)."""
