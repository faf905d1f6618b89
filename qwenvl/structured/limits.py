"""How big a schema a request may ask its output to follow: checked before any grammar is compiled.

Grammar compile time grows about cubically with a schema's size (measured with xgrammar 0.2.9: 1,000
optional integer properties 0.7 s, 4,000 39 s), so the size is bounded up front and the compile itself has a
deadline (the engine's, qwenvl/engine/grammar_compiles.py). The defaults are far above what a real response
format or tool declares (OpenAI's own structured outputs allow 5,000 properties and 10 levels of nesting).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .errors import InvalidStructuredOutputError


@dataclass(frozen=True)
class SchemaLimits:
    max_bytes: int = 64 * 1024          # the schema as compact JSON text
    max_properties: int = 1000          # keys of every `properties` object in the schema, all levels together
    max_depth: int = 32                 # objects/arrays nested in the schema document
    compile_timeout_s: float = 10.0     # the grammar compile's deadline (the engine enforces it)

    def __post_init__(self):
        for name in ("max_bytes", "max_properties", "max_depth"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.compile_timeout_s > 0:
            raise ValueError(f"compile_timeout_s must be > 0, got {self.compile_timeout_s!r}")


class SchemaTooLargeError(InvalidStructuredOutputError):
    """A schema past one of the limits; the message names the limit and the server flag that sets it."""


def check_schema_limits(schema_json: str, limits: SchemaLimits, where: str = "") -> None:
    """Raise SchemaTooLargeError naming the first limit `schema_json` is past; `where` prefixes the message."""
    at = f"{where}: " if where else ""
    size = len(schema_json.encode("utf-8"))
    if size > limits.max_bytes:
        raise SchemaTooLargeError(f"{at}the schema is {size} bytes as compact JSON, over the limit of "
                                  f"{limits.max_bytes} bytes (--max-schema-bytes)")
    properties, depth = _measure(json.loads(schema_json))
    if depth > limits.max_depth:
        raise SchemaTooLargeError(f"{at}the schema nests {depth} levels of objects/arrays, over the limit of "
                                  f"{limits.max_depth} (--max-schema-depth)")
    if properties > limits.max_properties:
        raise SchemaTooLargeError(f"{at}the schema declares {properties} properties, over the limit of "
                                  f"{limits.max_properties} (--max-schema-properties)")


def _measure(schema) -> tuple[int, int]:
    """(properties declared at every level, deepest nesting), walked without recursion: the request body
    parser already bounds the nesting, but this must not be the thing that overflows the stack."""
    properties, deepest = 0, 0
    stack = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            deepest = max(deepest, depth)
            props = node.get("properties")
            if isinstance(props, dict):
                properties += len(props)
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in node)
    return properties, deepest
