"""Schemathesis against the server's own OpenAPI document, with the bundled model: every route, bodies the
document allows and bodies it does not, 0 answers with a 5xx, 0 answers outside the documented schema.

Run through schemathesis' own command line (its pytest plugin does not load under this pytest)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qwenvl.engine.async_engine import AsyncEngine
from qwenvl.engine.llm_engine import EngineConfig, LLMEngine
from qwenvl.server.app import create_app
from qwenvl.server.settings import ServerSettings
from test_server_fake_engine import run_server

CHECKS = "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance"


def schemathesis_command() -> list[str]:
    exe = Path(sys.executable).with_name("schemathesis")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("schemathesis")
    if found is None:
        pytest.skip("schemathesis is not installed (pip install 'qwenvl[test]')")
    return [found]


@pytest.fixture(scope="module")
def server_url():
    # A short context and a small default answer keep each fuzzed generation to milliseconds.
    engine = LLMEngine(None, device="cpu", config=EngineConfig(kv_cache_gb=0.05, max_model_len=320))
    async_engine = AsyncEngine(engine, max_queue=64)
    settings = ServerSettings(default_max_tokens=4, max_images=2, fetch_connect_timeout_s=0.5,
                              fetch_read_timeout_s=0.5)
    with run_server(create_app(async_engine, settings)) as url:
        yield url
    asyncio.run(async_engine.shutdown(grace_s=1))


def test_openapi_document_fuzzed_without_5xx_or_schema_breaks(server_url, tmp_path):
    cmd = schemathesis_command() + [
        "run", server_url + "/openapi.json", "--checks", CHECKS, "--max-examples", "20", "--seed", "7",
        "--generation-deterministic", "--phases", "examples,coverage,fuzzing", "--request-timeout", "60",
        "--suppress-health-check", "all"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
