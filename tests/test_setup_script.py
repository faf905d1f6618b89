"""scripts/setup.sh shows each demo command exactly as it runs it (issue 38 part 4: it once showed a command
without the `--boxes` it ran)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = (ROOT / "scripts" / "setup.sh").read_text(encoding="utf-8")


def test_every_demo_line_echoes_the_arguments_it_runs(tmp_path):
    function = re.search(r"^demo\(\) \{\n.*?^\}\n", SCRIPT, flags=re.S | re.M).group(0)
    calls = re.findall(r"^\s*(demo .+)$", SCRIPT, flags=re.M)
    assert len(calls) >= 3 and any("--boxes" in c for c in calls)
    assert ".venv/bin/qwenvl" not in SCRIPT.replace(function, "")     # the demo runs nothing the function hides
    fake = tmp_path / ".venv" / "bin" / "qwenvl"                          # prints the argv it was given
    fake.parent.mkdir(parents=True)
    fake.write_text(f"#!{sys.executable}\nimport json, sys\nprint('ARGV ' + json.dumps(sys.argv[1:]))\n")
    fake.chmod(0o755)
    out = subprocess.run(["bash", "-c", function + "\n".join(calls)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 * len(calls)
    for shown, ran in zip(lines[::2], lines[1::2]):
        assert shown.startswith("$ qwenvl ")
        assert shlex.split(shown[len("$ qwenvl "):]) == json.loads(ran[len("ARGV "):]), (shown, ran)
