"""What a request asks its output to be: any JSON object, JSON valid against a schema, or a tool call.

The spec validates eagerly, so a bad schema fails when the request is built (the server maps
InvalidStructuredOutputError, a ValueError, to a 400 naming the field) and never inside the batched step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .errors import InvalidStructuredOutputError
from .limits import SchemaLimits, check_schema_limits
from .satisfiable import check_satisfiable

__all__ = ["InvalidStructuredOutputError", "StructuredOutput", "check_schema"]

KINDS = ("json_object", "json_schema", "tool_call")




@dataclass(frozen=True)
class StructuredOutput:
    kind: str                       # "json_object" (rooted at an object), "json_schema" or "tool_call"
    schema_json: str | None = None  # compact JSON text of the schema: hashable, the compile-cache key
    # the request field the structure came from ("response_format.json_schema.schema", "tools", ...), for
    # error messages; not part of the cache key
    source: str = field(default="", compare=False)
    # tool_call: the output is one `<tool_call>\n{"name": N, "arguments": A}\n</tool_call>` block whose
    # body matches schema_json (one branch per allowed tool, arguments = that tool's parameters).

    @classmethod
    def json_object(cls) -> "StructuredOutput":
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: dict | str, limits: SchemaLimits | None = None) -> "StructuredOutput":
        """`limits`: checked before the (slow, for a large schema) metaschema check."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise InvalidStructuredOutputError(f"json_schema is not valid JSON: {e}") from None
        text = json.dumps(schema, separators=(",", ":"))       # key order kept: it is the output order
        if limits is not None:
            check_schema_limits(text, limits)
        return cls("json_schema", text)

    @classmethod
    def tool_call(cls, tools: list[dict], name: str | None = None,
                  limits: SchemaLimits | None = None) -> "StructuredOutput":
        """Force a call: to the tool `name`, or (tool_choice "required") to any of `tools` (OpenAI shape)."""
        branches = []
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise InvalidStructuredOutputError(f"tools[{i}] needs function.name")
            if name is None or fn["name"] == name:
                params = fn.get("parameters") or {"type": "object"}
                branches.append({"type": "object", "required": ["name", "arguments"], "additionalProperties": False,
                                 "properties": {"name": {"const": fn["name"]}, "arguments": params}})
        if not branches:
            raise InvalidStructuredOutputError(
                f"tool_choice names {name!r}, which is not among the declared tools" if name
                else "tool_choice 'required' needs at least one tool")
        schema = branches[0] if len(branches) == 1 else {"anyOf": branches}
        text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
        if limits is not None:
            check_schema_limits(text, limits)
        return cls("tool_call", text)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InvalidStructuredOutputError(f"structured kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind != "json_object":
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
    check_satisfiable(schema)
