"""Schemas a grammar cannot honour, found before compiling: a 400 naming the place, never a silently
loosened grammar (xgrammar, measured with 0.2.9, warns and admits anything for a remote `$ref`, and accepts
a required property that `additionalProperties: false` forbids, or a `$ref` cycle through required
properties, neither of which any finite JSON document satisfies)."""

from __future__ import annotations

from .errors import InvalidStructuredOutputError


def check_satisfiable(schema) -> None:
    """Raise InvalidStructuredOutputError for an unresolvable `$ref`, a required property no object may hold,
    or a `$ref` that requires itself without end. Walks without recursion (schemas may be deep)."""
    stack = [(schema, "")]
    while stack:
        node, at = stack.pop()
        if isinstance(node, list):
            stack.extend((v, f"{at}/{i}") for i, v in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        ref = node.get("$ref")
        if isinstance(ref, str):
            _resolve(schema, ref, at)
        _check_required(node, at)
        stack.extend((v, f"{at}/{k}") for k, v in node.items() if k not in ("const", "enum", "default", "examples"))
    _check_required_cycles(schema)


def _where(at: str) -> str:
    return at.lstrip("/") or "(root)"


def _resolve(root, ref: str, at: str):
    """The schema a local `$ref` points to; a remote one, or one that leads nowhere, is an error."""
    if ref != "#" and not ref.startswith("#/"):
        raise InvalidStructuredOutputError(
            f"$ref {ref[:100]!r} at {_where(at)}: only local references ('#/$defs/...') are supported; put the "
            "referenced schema under $defs")
    node = root
    for part in ref[2:].split("/") if ref != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise InvalidStructuredOutputError(f"$ref {ref[:100]!r} at {_where(at)}: points to nothing in the schema")
    return node


def _check_required(node: dict, at: str) -> None:
    required = node.get("required")
    if node.get("additionalProperties") is not False or not isinstance(required, list) or "patternProperties" in node:
        return
    declared = node.get("properties") if isinstance(node.get("properties"), dict) else {}
    missing = [r for r in required if isinstance(r, str) and r not in declared]
    if missing:
        raise InvalidStructuredOutputError(
            f"at {_where(at)}: required {missing[:5]} not among the properties, and additionalProperties is false: "
            "no object can satisfy it")


def _check_required_cycles(root) -> None:
    """A `$ref` whose target requires, through required properties only, the same `$ref` again: every valid
    document would be infinite."""
    refs = {}                                   # ref -> refs it requires directly

    def required_refs(node, seen_ids) -> set[str]:
        out: set[str] = set()
        pending = [node]
        while pending:
            n = pending.pop()
            if not isinstance(n, dict) or id(n) in seen_ids:
                continue
            seen_ids.add(id(n))
            if isinstance(n.get("$ref"), str):
                out.add(n["$ref"])
            for key in ("allOf",):
                if isinstance(n.get(key), list):
                    pending.extend(n[key])
            props = n.get("properties") if isinstance(n.get("properties"), dict) else {}
            for name in n.get("required") or []:
                if isinstance(name, str) and name in props:
                    pending.append(props[name])
        return out

    todo = list(required_refs(root, set()))
    while todo:
        ref = todo.pop()
        if ref in refs:
            continue
        try:
            target = _resolve(root, ref, "")
        except InvalidStructuredOutputError:
            refs[ref] = set()
            continue
        refs[ref] = required_refs(target, set())
        todo.extend(refs[ref])
    # a cycle in the graph ref -> required refs
    state: dict[str, int] = {}
    for start in refs:
        if state.get(start):
            continue
        path = [(start, iter(sorted(refs[start])))]
        state[start] = 1
        while path:
            ref, children = path[-1]
            child = next(children, None)
            if child is None:
                state[ref] = 2
                path.pop()
            elif state.get(child) == 1:
                raise InvalidStructuredOutputError(
                    f"$ref {child[:100]!r} requires itself through required properties: no finite JSON satisfies it")
            elif not state.get(child) and child in refs:
                state[child] = 1
                path.append((child, iter(sorted(refs[child]))))
