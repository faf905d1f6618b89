"""The one error structured output raises for a request it cannot honour (light: no xgrammar, no jsonschema)."""

from __future__ import annotations


class InvalidStructuredOutputError(ValueError):
    """The requested structure cannot be compiled: the message names what is wrong, `param` the request field
    (when known)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
