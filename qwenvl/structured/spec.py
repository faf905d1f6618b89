"""What a request asks its output to be: any JSON object, JSON valid against a schema, or a tool call.

The spec validates eagerly, so a bad schema fails when the request is built (the server maps
InvalidStructuredOutputError, a ValueError, to a 400 naming the field) and never inside the batched step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

KINDS = ("json_object", "json_schema")


class InvalidStructuredOutputError(ValueError):
    """The requested structure cannot be compiled: the message names what is wrong."""


@dataclass(frozen=True)
class StructuredOutput:
    kind: str                       # "json_object" (rooted at an object) or "json_schema"
    schema_json: str | None = None  # canonical JSON text of the schema: hashable, a cache key

    @classmethod
    def json_object(cls) -> "StructuredOutput":
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: dict | str) -> "StructuredOutput":
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise InvalidStructuredOutputError(f"json_schema is not valid JSON: {e}") from None
        return cls("json_schema", json.dumps(schema, sort_keys=True, separators=(",", ":")))

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InvalidStructuredOutputError(f"structured kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "json_schema":
            check_schema(self.schema_json)

    @property
    def schema(self) -> dict | None:
        return None if self.schema_json is None else json.loads(self.schema_json)


def check_schema(schema_json: str | None) -> None:
    """Reject a schema that is not a JSON Schema document (checked against its metaschema)."""
    if schema_json is None:
        raise InvalidStructuredOutputError("json_schema needs a schema")
    schema = json.loads(schema_json)
    if not isinstance(schema, (dict, bool)):
        raise InvalidStructuredOutputError(
            f"json_schema must be an object (or boolean), got {type(schema).__name__}")
    import jsonschema  # imported here: only structured requests need it

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise InvalidStructuredOutputError(f"invalid json_schema at {where}: {e.message}") from None
