"""The layering stays true: front ends never import each other or reach back up a level."""

from __future__ import annotations

import ast
from pathlib import Path

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
                if lines > 60 and (rel, node.name) != ("cli.py", "build_parser"):
                    long.append(f"{rel}:{node.name} ({lines} lines)")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)
