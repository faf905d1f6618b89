"""The README's examples run as written from the repository root, on the bundled model and examples/.

Every file a command or snippet names exists (or an earlier command writes it); every Python snippet
defines the names it uses; every `qwenvl` line parses with the real argument parser; and a representative
set of them runs here, on the bundled model. A line that needs the reader's own checkpoint, data, GPUs
or cluster says so with `# your ...` and is only parsed.
"""

import ast
import builtins
import contextlib
import io
import json
import re
import shlex
import textwrap
from pathlib import Path

import pytest

import qwenvl.cli.main as cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
MARK = "# your "                                  # the line needs something of the reader's
OUTPUT_FLAGS = ("--out", "--draw", "--per-record")
CONTINUES = "# continues the block above"        # a snippet that goes on from the previous one
MEDIA_NAME = re.compile(r"\b[\w-]+\.(?:png|jpe?g|pdf|mp4)\b")


def _blocks(lang: str) -> list[str]:
    """The bodies of the README's fenced blocks in `lang`, indentation removed (some sit in a list)."""
    found = re.findall(r"^( *)```(\w+)\n(.*?)^\1```", README, flags=re.S | re.M)
    return [textwrap.dedent(body) for _, kind, body in found if kind == lang]


def _commands() -> list[tuple[str, list[str]]]:
    """(the line as written, its words) for every shell command; `a; b` gives two."""
    out, pending = [], ""
    for block in _blocks("bash"):
        for raw in block.replace("\\\n", " ").splitlines():
            line = pending + raw
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";")
            lexer.whitespace_split = True
            try:
                words, current, pending = list(lexer), [], ""
            except ValueError:                     # a quoted argument goes on over the next line
                pending = line + "\n"
                continue
            for w in words + [";"]:
                if w == ";":
                    if current:
                        out.append((line, current))
                    current = []
                else:
                    current.append(w)
    return out


def _qwenvl_argv(words: list[str]) -> list[str] | None:
    if words[0] == "qwenvl":
        return words[1:]
    if words[:3] == ["python", "-m", "qwenvl"]:
        return words[3:]
    return None


def _looks_like_path(word: str) -> bool:
    if word.startswith(("-", "{", "$")) or "://" in word or ":" in word:
        return False
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]*)+", word) or re.fullmatch(r"[\w-]+\.(png|jpe?g|pdf|mp4|jsonl?)", word))


def _outputs(words: list[str]) -> list[str]:
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w in OUTPUT_FLAGS]


def test_commands_name_only_files_that_exist_or_an_earlier_command_writes():
    written = [".venv"]                           # scripts/setup.sh makes it
    missing = []
    for line, words in _commands():
        outputs = _outputs(words)
        if MARK not in line:
            for w in words:
                if w in outputs or not _looks_like_path(w):
                    continue
                made = any(w == o or w.startswith(o.rstrip("/") + "/") for o in written)
                if not made and not (ROOT / w).exists():
                    missing.append(f"{w!r} in: {line.strip()}")
        written += outputs
    assert not missing, "README commands name files that are not in the repository:\n" + "\n".join(missing)


def test_lines_that_need_the_readers_checkpoint_say_so():
    theirs = ("/models/", "/data/", "Qwen/", "my_data")
    unmarked = [line.strip() for line, words in _commands()
                if MARK not in line and any(w.startswith(theirs) for w in words)]
    assert not unmarked, "lines naming the reader's checkpoint, data or Hub id need '# your ...':\n" + "\n".join(unmarked)


def test_every_example_file_the_readme_names_exists():
    named = set(re.findall(r"examples/[\w.-]+", README))
    assert {"examples/shapes.png", "examples/predictions.jsonl", "examples/train.jsonl"} <= named
    written = {o for _, words in _commands() for o in _outputs(words)}      # e.g. --draw examples/shapes-boxes.png
    assert not [n for n in named - written if not (ROOT / n).exists()]
    outputs = {Path(o).name for o in written}
    media = set(MEDIA_NAME.findall(README)) - outputs
    homes = (ROOT, ROOT / "examples", ROOT / "docs")
    lost = sorted(n for n in media if not any((h / n).exists() for h in homes))
    assert not lost, f"the README names images/videos/PDFs that exist nowhere: {lost}"   # e.g. street.jpg, doc.png


def test_every_qwenvl_line_parses_with_the_real_parser():
    parser = cli.build_parser()
    seen = 0
    for line, words in _commands():
        argv = _qwenvl_argv(words)
        if argv is None:
            continue
        seen += 1
        try:
            parser.parse_args(argv)
        except SystemExit as e:                    # --help and --version exit 0; a wrong flag exits 2
            assert e.code == 0 and ("--help" in argv or "--version" in argv), line
    assert seen >= 25


def _snippets() -> list[str]:
    """Python blocks; one that starts with CONTINUES is joined to the one before it."""
    out: list[str] = []
    for block in _blocks("python"):
        if block.startswith(CONTINUES):
            out[-1] += "\n" + block
        else:
            out.append(block)
    return out


def _undefined_names(source: str) -> set[str]:
    """Names read but never bound anywhere in the snippet (scopes ignored: enough to catch `conv1`)."""
    tree = ast.parse(source)
    bound, read = set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return read - bound


def test_python_snippets_define_what_they_use_and_name_existing_files():
    snippets = _snippets()
    assert len(snippets) >= 5
    for source in snippets:
        assert not _undefined_names(source), (_undefined_names(source), source[:200])
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _looks_like_path(node.value):
                assert (ROOT / node.value).exists(), f"{node.value!r} in a Python example does not exist"
        assert not [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant) and n.value is Ellipsis], \
            "a snippet with an elided part (...)"


def test_training_format_rows_parse_and_their_images_sit_in_examples():
    rows = [json.loads(line) for block in _blocks("json") for line in block.splitlines() if line.strip()]
    assert rows
    for row in rows:
        for turn in row["messages"]:
            for part in turn["content"] if isinstance(turn["content"], list) else []:
                path = part.get("image") or (part.get("image_url") or {}).get("url")
                assert path is None or (ROOT / "examples" / path).exists()


def _printed(snippet: str) -> str:
    """The output the README shows for a Python block: the ```text block after it ("It prints ...")."""
    for block in re.finditer(r"^```python\n(.*?)^```\n", README, flags=re.S | re.M):
        shown = re.match(r"\nIt prints[^\n]*\n\n```text\n(.*?)^```", README[block.end():], flags=re.S | re.M)
        if block.group(1) == snippet and shown:
            return shown.group(1)
    raise AssertionError(f"the README shows no output for the block starting {snippet[:60]!r}")


def test_the_python_api_example_runs_on_the_bundled_model(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    scope: dict = {}
    exec(compile(_snippets()[0], "README.md (Use it)", "exec"), scope)
    box = scope["out"].boxes if "box_out" not in scope else scope["box_out"].boxes
    assert [b["label"] for b in box] == ["the white triangle"]
    assert len(scope["outs"]) == 3 and all(o.finish_reason for o in scope["outs"])
    assert capsys.readouterr().out == _printed(_snippets()[0])       # what the README says it prints


@pytest.mark.slow
def test_the_sdk_block_prints_what_the_readme_shows_against_the_server(monkeypatch, capsys):
    """The openai and dashscope SDK block (a data: URL, then a local file the dashscope SDK uploads) against
    the bundled model behind the server, started as the README's `qwenvl serve` line starts it."""
    import asyncio

    from test_server_fake_engine import run_server

    from qwenvl.engine.async_engine import AsyncEngine
    from qwenvl.engine.llm_engine import LLMEngine
    from qwenvl.server.app import create_app
    from qwenvl.server.settings import ServerSettings

    monkeypatch.chdir(ROOT)
    block = next(b for b in _snippets() if "from openai import OpenAI" in b)
    engine = AsyncEngine(LLMEngine(None, device="cpu"), max_queue=4)
    try:
        with run_server(create_app(engine, ServerSettings(api_key="sk-local", served_model_name="qwenvl,qwen-vl"))) \
                as url:
            exec(compile(block.replace("http://127.0.0.1:8000", url), "README.md (HTTP APIs)", "exec"), {})
    finally:
        asyncio.run(engine.shutdown(grace_s=1))
    assert capsys.readouterr().out == _printed(block.split("\n" + CONTINUES)[0])


def _readme_command(prefix: list[str]) -> list[str]:
    """The one unmarked README command that starts with `prefix`."""
    found = [words for line, words in _commands()
             if MARK not in line and (_qwenvl_argv(words) or [])[:len(prefix)] == prefix]
    assert found, f"no README command starts with qwenvl {' '.join(prefix)}"
    return _qwenvl_argv(found[0])


def _run(argv: list[str], tmp_path: Path) -> str:
    """cli.main on the README's words, with what it writes (--out, --draw, --per-record, out/...) under tmp_path."""
    moved = []
    for i, w in enumerate(argv):
        if w.startswith("out/") or (i and argv[i - 1] in OUTPUT_FLAGS):
            w = str(tmp_path / w)
            Path(w).parent.mkdir(parents=True, exist_ok=True)
        moved.append(w)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(moved) == 0, moved
    return buf.getvalue()


def _shown_output(prefix: list[str]) -> str:
    """What the README's comment says the command starting with `prefix` prints ("# prints: X" / "then X")."""
    line = next(line for line, words in _commands()
                if MARK not in line and (_qwenvl_argv(words) or [])[:len(prefix)] == prefix)
    comment = line.split("  # ", 1)[1]
    return comment.split("prints: ", 1)[1] if "prints: " in comment else comment.split(", then ", 1)[1]


def test_readme_cli_examples_run(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    chat = ["chat", "--image", "examples/shapes.png"]
    assert _run(_readme_command(chat), tmp_path).strip() == _shown_output(chat) == "red"
    printed = _run(_readme_command(["ground"]), tmp_path)
    assert [b["label"] for b in json.loads(printed.splitlines()[-1])] == ["the white triangle"]
    assert json.loads(printed.splitlines()[-1]) == json.loads(_shown_output(["ground"]))     # as the README shows
    assert (tmp_path / "examples" / "shapes-boxes.png").exists()

    table = _run(_readme_command(["eval", "score"]), tmp_path)
    assert "| docvqa | 2 | 90.00 |" in table and "| chartqa | 2 | 50.00 |" in table
    assert len((tmp_path / "out" / "scores.jsonl").read_text().splitlines()) == 7

    _run(_readme_command(["eval", "synth"]), tmp_path)
    run = [w for w in _readme_command(["eval", "run"]) if w != "--no-progress"] + ["--no-progress"]
    printed = _run(run, tmp_path)
    report = (tmp_path / "out" / "eval" / "report.md").read_text(encoding="utf-8")
    for text in (printed, report, (tmp_path / "out" / "eval" / "report.json").read_text(encoding="utf-8")):
        assert str(ROOT) not in text and "/work/" not in text and "/home/" not in text   # no developer's path


@pytest.mark.slow
def test_readme_train_example_runs_and_its_result_loads(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    summary = json.loads(_run(_readme_command(["train"]), tmp_path).splitlines()[-1])
    assert summary["steps"] == 2 and summary["final_dir"] == str(tmp_path / "out" / "sft" / "final")
    assert _run(_readme_command(["chat", "--model", "out/sft/final"]), tmp_path).strip()
