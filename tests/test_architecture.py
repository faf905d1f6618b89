"""The layering stays true: front ends never import each other or reach back up a level; no import loops; the
package root holds only the public entry points."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "qwenvl"

# A front end may use the engine, inputs and outputs, never another front end.
FRONT_ENDS = ("server", "web", "evaluation", "training")
# The composition root may wire rooms together: `serve --ui` mounts the web demo on the server.
COMPOSITION = {"server/cli.py": {"web"}}
# Known debts, to shrink. (The synthetic scenes the demo and eval share live in qwenvl/synthetic/.)
KNOWN: dict[str, set[str]] = {}


def _imports(path: Path) -> set[str]:
    """Top-level qwenvl packages a module imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    parts = path.relative_to(PKG).with_suffix("").parts
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(parts[:len(parts) - node.level])
                mod = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("qwenvl."):
                mod = node.module.split(".")[1:]
            else:
                continue
            if mod:
                found.add(mod[0])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("qwenvl."))
    return found


def test_front_ends_do_not_import_each_other():
    bad = []
    for room in FRONT_ENDS:
        for path in (PKG / room).rglob("*.py"):
            rel = str(path.relative_to(PKG))
            others = _imports(path) & (set(FRONT_ENDS) - {room}) - COMPOSITION.get(rel, set()) - KNOWN.get(rel, set())
            if others:
                bad.append(f"{rel} imports {sorted(others)}")
    assert not bad, "front end imports another front end:\n" + "\n".join(bad)


def test_the_web_demo_does_not_import_the_server():
    """The demo is mounted by the server; it gets what it needs (API prefixes, engine facts) from app state."""
    for path in (PKG / "web").rglob("*.py"):
        assert "server" not in _imports(path), f"{path.relative_to(PKG)} imports the server"


def test_server_and_web_read_engine_facts_through_engine_info():
    for room in ("server", "web"):
        for path in (PKG / room).rglob("*.py"):
            text = path.read_text()
            assert 'getattr(state.engine, "engine"' not in text and 'getattr(engine, "engine"' not in text \
                and 'getattr(async_engine, "engine"' not in text, f"{path} reaches into the engine"


def test_the_web_demo_mounts_over_engine_info_alone():
    """The demo reads device/dtype/name from EngineInfo and API prefixes from app state (no server import)."""
    from fastapi.testclient import TestClient
    from test_server_fake_engine import FakeAsyncEngine

    from qwenvl.server.app import create_app
    from qwenvl.server.settings import ServerSettings
    from qwenvl.web.app import mount

    app = create_app(FakeAsyncEngine(), ServerSettings(), mount_ui=mount)
    with TestClient(app) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert client.get("/v1/models").json()["data"][0]["id"] == "fake-model"


def test_front_ends_catch_engine_errors_by_type_not_by_name():
    for room in ("server", "web"):
        for path in (PKG / room).rglob("*.py"):
            assert '__name__ == "QueueFull"' not in path.read_text(), f"{path} matches an error by its class name"


def test_no_function_is_longer_than_sixty_lines():
    """Long bodies become named steps; only the command line's argument table may run longer."""
    long = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                rel = str(path.relative_to(PKG))
                if lines > 60 and (rel, node.name) != ("cli/main.py", "build_parser"):
                    long.append(f"{rel}:{node.name} ({lines} lines)")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)


# The rooms from the bottom up (shared/DESIGN.md section 2): a module imports only its own room and rooms
# listed before it. Rooms on one line are peers (the front ends: the first test above keeps them apart).
ROOM_ORDER = (
    ("kernels",), ("layers",), ("models",), ("checkpoints",), ("structured",), ("sampling_params",),
    ("answers",), ("inputs",), ("tokenizer",), ("distributed",), ("engine",), ("llm", "__init__"),
    ("synthetic",), ("evaluation", "training", "server", "web"), ("cli", "__main__"),
)
RANK = {room: rank for rank, rooms in enumerate(ROOM_ORDER) for room in rooms}
ROOT_FILES = {"__init__.py", "__main__.py", "llm.py", "sampling_params.py", "tokenizer.py"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_graph() -> dict[str, set[str]]:
    """module -> the qwenvl modules it imports anywhere in its body (lazy imports inside functions count too).
    `from pkg import sub` depends on the submodule `sub`, not on the package's __init__."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                elif node.module and node.module.startswith("qwenvl"):
                    target = node.module
                else:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in modules else target)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("qwenvl."))
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1
        stack.append(root); on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter[0]; counter[0] += 1
                    stack.append(nxt); on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop(); on_stack.discard(m); component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_loops_between_modules():
    assert _cycles(_module_graph()) == []


def test_the_loop_finder_finds_a_loop():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_lower_rooms_never_import_higher_ones():
    bad = []
    for module, imported in _module_graph().items():
        for other in imported:
            a, b = _room(module), _room(other)
            assert a in RANK and b in RANK, f"room {a if a not in RANK else b} is missing from ROOM_ORDER"
            if RANK[b] > RANK[a]:
                bad.append(f"{module} ({a}) imports {other} ({b})")
    assert not bad, "a lower room imports a higher one:\n" + "\n".join(bad)


def test_the_package_root_holds_only_the_entry_points():
    loose = {p.name for p in PKG.iterdir() if p.is_file() and p.suffix == ".py"} - ROOT_FILES
    assert not loose, f"modules loose at the package root: {sorted(loose)}; give them a room"


@pytest.mark.parametrize("old, new", [
    ("qwenvl.grounding", "qwenvl.answers.grounding"), ("qwenvl.quantize", "qwenvl.checkpoints.quantize"),
    ("qwenvl.loader", "qwenvl.checkpoints.loader"), ("qwenvl.outputs", "qwenvl.answers.outputs"),
    ("qwenvl.config", "qwenvl.models.config"), ("qwenvl.quant_formats.awq", "qwenvl.checkpoints.quant_formats.awq"),
    ("qwenvl.ocr", "qwenvl.answers.ocr"), ("qwenvl.drawing", "qwenvl.answers.drawing"),
])
def test_old_import_paths_still_work_with_a_deprecation_warning(old, new):
    """In a fresh interpreter: the first import of the old name warns and gives the very module of the new one."""
    code = (f"import warnings; warnings.simplefilter('error', DeprecationWarning)\n"
            f"try:\n    import {old}\nexcept DeprecationWarning as e:\n    print('warned:', e)\n"
            f"warnings.simplefilter('ignore')\nimport importlib, {new}\n"
            f"assert importlib.import_module('{old}') is {new}\nprint('same module')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    warned_for = old if old.count(".") == 1 else old.rsplit(".", 1)[0]     # a package warns when its parent moved
    assert f"warned: {warned_for} moved to " in out.stdout and "same module" in out.stdout


def test_documented_old_names_resolve_in_process():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from qwenvl.grounding import parse_boxes
    assert parse_boxes is importlib.import_module("qwenvl.answers.grounding").parse_boxes
