"""`qwenvl serve --replicas N`: engine replicas on Ray Serve behind one HTTP front.

Routing and CLI wiring are tested in-process; the rest runs the real command (2 replicas, a tiny random
checkpoint, a local Ray cluster on loopback) once for the module and talks to it over HTTP. The last test
sends SIGTERM and checks that no process the command started is left.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from qwenvl.server.replica_proxy import pick_replica

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["replica-0", "replica-1", "replica-2"]


# ------------------------------------------------------------------ routing and wiring (no Ray needed)
def test_affinity_is_stable_and_spreads_keys_over_replicas():
    idle = {n: 0 for n in NAMES}
    homes = {f"img{i}": pick_replica(NAMES, f"img{i}", idle) for i in range(60)}
    assert all(pick_replica(NAMES, k, idle) == h for k, h in homes.items())
    assert set(homes.values()) == set(NAMES)
    # removing a replica moves only the keys it owned (rendezvous hashing)
    moved = [k for k, h in homes.items() if h != "replica-2" and pick_replica(NAMES[:2], k, idle) != h]
    assert moved == []


def test_no_key_goes_to_the_least_loaded_and_a_busy_home_spills():
    running = {"replica-0": 3, "replica-1": 1, "replica-2": 2}
    assert pick_replica(NAMES, None, running) == "replica-1"
    key = next(f"k{i}" for i in range(100) if pick_replica(NAMES, f"k{i}", {n: 0 for n in NAMES}) == "replica-0")
    assert pick_replica(NAMES, key, running, spill=4) == "replica-0"      # 2 more than the least: stays home
    assert pick_replica(NAMES, key, running, spill=2) == "replica-1"      # at the spill margin: goes elsewhere
    assert pick_replica(NAMES, None, {n: 0 for n in NAMES}, up={"replica-0": False}) == "replica-1"


def test_cli_hands_every_engine_flag_to_the_replicas(monkeypatch):
    import qwenvl.cli.main as cli
    from qwenvl.server import replicas

    seen = {}
    monkeypatch.setattr(replicas, "serve_replicas",
                        lambda settings, options, cluster, serve_http: seen.update(s=settings, o=options, c=cluster) or 0)
    rc = cli.main(["serve", "--replicas", "3", "--ray-address", "10.0.0.5:6379", "--model", "/ckpt", "--dtype",
                   "bfloat16", "--device", "cuda", "--quantization", "int8", "--quantize-vision", "--kv-cache-gb",
                   "2.5", "--max-model-len", "4096", "--max-queue", "7"])
    assert rc == 0
    s, o, c = seen["s"], seen["o"], seen["c"]
    assert (s.model, s.dtype, s.device, s.max_queue) == ("/ckpt", "bfloat16", "cuda", 7)
    assert o == {"kv_cache_gb": 2.5, "max_model_len": 4096, "quantization": "int8", "quantize_vision": True,
                 "max_prefill_tokens_while_decoding": 64, "vision_rows_per_step": 1024}   # serve's caps (cli/serving_defaults.py)
    assert (c.replicas, c.address, c.dashboard) == (3, "10.0.0.5:6379", False)
    assert s.drain_grace_s == 20.0             # SIGTERM drain + Ray shutdown stay within 30 s


def test_a_replica_builds_its_engine_from_the_flags(tiny_checkpoint):
    from qwenvl.server.replica_worker import EngineReplica
    from qwenvl.server.settings import ServerSettings

    replica = EngineReplica(ServerSettings(model=str(tiny_checkpoint("qwen2_vl")), dtype="float32", device="cpu"),
                            {"max_model_len": 200, "kv_cache_gb": 0.01})
    try:
        info = replica.info()
        assert (info.max_model_len, info.dtype, info.device) == (200, "float32", "cpu")
        assert replica.stats()["pid"] == os.getpid()
        replica.check_health()
    finally:
        asyncio.run(replica.engine.shutdown(grace_s=0))


def test_without_ray_the_command_says_how_to_install_it(tmp_path):
    fake = tmp_path / "ray"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('ray is not installed here')\n")
    r = subprocess.run([sys.executable, "-m", "qwenvl", "serve", "--replicas", "2"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}"))
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if "pip install 'qwenvl[cluster]'" in ln]
    assert len(lines) == 1, r.stderr


class _FakeHandle:
    """The slice of a Ray Serve DeploymentHandle that ReplicaEngine uses, scripted."""

    def __init__(self, name: str, dead: bool = False, tokens: int = 3):
        self.name, self.dead, self.tokens = name, dead, tokens
        self.generated: list[str] = []
        self.aborted: list[str] = []
        self.cancelled = 0
        self.generate = SimpleNamespace(remote=self._generate)
        self.abort = SimpleNamespace(remote=self.aborted.append)
        self.stats = SimpleNamespace(remote=lambda: SimpleNamespace(result=self._stats))

    def options(self, stream: bool):
        return self

    def _stats(self, timeout_s):
        if self.dead:
            raise TimeoutError("no answer")
        return {"kv_blocks_total": 10}

    def _generate(self, prompt, params, rid):
        from ray.exceptions import ActorDiedError

        from qwenvl.answers.outputs import RequestOutput

        handle = self

        async def outputs():
            if handle.dead:
                raise ActorDiedError()
            handle.generated.append(rid)
            for i in range(handle.tokens):
                await asyncio.sleep(0)
                yield RequestOutput(rid, text="x" * (i + 1), delta_text="x", token_ids=list(range(i + 1)),
                                    finish_reason="length" if i == handle.tokens - 1 else None)

        class Stream:
            def __aiter__(self):
                return outputs()

            def cancel(self):
                handle.cancelled += 1

        return Stream()


def test_a_dead_replica_is_skipped_and_an_early_exit_cancels_the_stream():
    pytest.importorskip("ray")
    from qwenvl.server.replica_proxy import ReplicaEngine

    alive, dead = _FakeHandle("replica-1"), _FakeHandle("replica-0", dead=True)
    engine = ReplicaEngine({"replica-0": dead, "replica-1": alive}, info=None, poll_s=60)
    prompt = SimpleNamespace(vision=[])

    async def run():
        outs = [o async for o in engine.generate(prompt, None, "a")]       # idle tie: replica-0 first, dead
        agen = engine.generate(prompt, None, "b")
        first = await agen.__anext__()
        engine.abort("b")
        await agen.aclose()                                                 # the client left after one token
        return outs, first

    outs, first = asyncio.run(run())
    assert outs[-1].finished and alive.generated == ["a", "b"] and first.text == "x"
    assert alive.aborted == ["b"] and alive.cancelled == 1
    stats = engine.stats()
    assert stats["replicas"]["replica-0"]["up"] == 0 and stats["replicas"]["replica-1"]["requests_served"] == 1
    assert stats["num_active"] == 0
    asyncio.run(engine.shutdown(grace_s=0))


# ------------------------------------------------------------------ the real command on a local cluster
def _image(seed: int) -> str:
    from PIL import Image

    img = Image.new("RGB", (56, 56), ((seed * 53) % 256, (seed * 97) % 256, (seed * 31) % 256))
    img.putpixel((seed % 56, 7), (255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(image: str | None = None, stream: bool = False) -> dict:
    content = [{"type": "text", "text": "describe"}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0,
            "stream": stream}


def _descendants(pid: int) -> set[int]:
    import psutil

    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    pytest.importorskip("ray")
    pytest.importorskip("psutil")
    from test_server_fake_engine import free_port

    ckpt = tiny_checkpoint("qwen2_vl")
    raytmp = tempfile.mkdtemp(prefix="qr", dir="/tmp")          # short: Ray's unix socket paths are limited
    log_path = tmp_path_factory.mktemp("replicas") / "serve.log"
    port = free_port()
    cmd = [sys.executable, "-m", "qwenvl", "serve", "--replicas", "2", "--model", str(ckpt), "--dtype", "float32",
           "--device", "cpu", "--port", str(port), "--max-model-len", "1024", "--kv-cache-gb", "0.05",
           "--ray-object-store-mb", "100", "--drain-grace", "5"]
    env = dict(os.environ, RAY_TMPDIR=raytmp, PYTHONPATH=str(ROOT))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 150
    while True:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("qwenvl serve --replicas 2 did not start:\n" + log_path.read_text()[-3000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    yield SimpleNamespace(url=url, proc=proc, raytmp=raytmp, log=log_path)
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


def test_24_concurrent_requests_are_answered_alike_by_both_replicas(served):
    async def run():
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as client:
            async def plain():
                r = await client.post("/v1/chat/completions", json=_chat())
                assert r.status_code == 200, r.text
                return r.headers["x-qwenvl-replica"], r.json()["choices"][0]["message"]["content"]

            async def streamed():
                text = ""
                async with client.stream("POST", "/v1/chat/completions", json=_chat(stream=True)) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            import json
                            for choice in json.loads(line[6:])["choices"]:
                                text += choice["delta"].get("content") or ""
                    return r.headers["x-qwenvl-replica"], text

            return await asyncio.gather(*(plain() if i % 2 else streamed() for i in range(24)))

    results = asyncio.run(run())
    assert len(results) == 24
    assert {replica for replica, _ in results} == {"replica-0", "replica-1"}
    texts = {text for _, text in results}
    assert len(texts) == 1 and texts != {""}, texts          # greedy: the same answer from either replica

    metrics = httpx.get(served.url + "/metrics").text
    for name in ("replica-0", "replica-1"):
        served_n = re.search(rf'qwenvl_replica_requests_served{{replica="{name}"}} (\S+)', metrics)
        assert served_n and float(served_n.group(1)) >= 1
        assert re.search(rf'qwenvl_replica_requests_running{{replica="{name}"}} 0\.0', metrics)
        assert re.search(rf'qwenvl_replica_kv_blocks_total{{replica="{name}"}} [1-9]', metrics)


def test_the_same_first_image_goes_to_the_same_replica(served):
    homes = {}
    for seed in range(6):
        image = _image(seed)
        first = httpx.post(served.url + "/v1/chat/completions", json=_chat(image), timeout=60)
        again = httpx.post(served.url + "/v1/chat/completions", json=_chat(image), timeout=60)
        assert first.status_code == again.status_code == 200, first.text
        assert first.headers["x-qwenvl-replica"] == again.headers["x-qwenvl-replica"]
        # the replica that saw the image already holds it: the repeated prompt comes from its prefix cache
        assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        homes[seed] = first.headers["x-qwenvl-replica"]
    assert set(homes.values()) == {"replica-0", "replica-1"}, homes


def test_dashscope_route_and_errors_carry_the_replica_header(served):
    ds = httpx.post(served.url + "/api/v1/services/aigc/multimodal-generation/generation", timeout=60,
                    json={"input": {"messages": [{"role": "user", "content": [{"text": "hi"}]}]},
                          "parameters": {"max_tokens": 4, "temperature": 0}})
    assert ds.status_code == 200 and ds.headers["x-qwenvl-replica"] in ("replica-0", "replica-1")
    bad = httpx.post(served.url + "/v1/chat/completions", json={"messages": []}, timeout=30)
    assert bad.status_code == 400 and bad.headers["x-qwenvl-replica"] == "none"
    # a prompt the replica's tokenizer refuses: its InputError crosses Ray and is still a 400 naming the field
    r = httpx.post(served.url + "/v1/chat/completions", timeout=30, json={
        "max_tokens": 2, "messages": [{"role": "user", "content": "a <|image_pad|> here"}]})
    assert r.status_code == 400 and "image/video slots" in r.json()["error"]["message"], r.text
    assert r.headers["x-qwenvl-replica"] in ("replica-0", "replica-1")
    r = httpx.post(served.url + "/v1/chat/completions", json={**_chat(), "max_tokens": 5000}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_the_local_cluster_listens_on_loopback_only(served):
    import ipaddress

    import psutil

    ours = _descendants(served.proc.pid) | {served.proc.pid}
    exposed = []
    for conn in psutil.net_connections("inet"):
        if conn.status != psutil.CONN_LISTEN or conn.pid not in ours:
            continue
        ip = ipaddress.ip_address(conn.laddr.ip)
        ip = ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip
        if not ip.is_loopback:
            name = psutil.Process(conn.pid).name()
            # Known, Ray's own: Serve replicas (Ray 2.5x-2.60) bind their inter-deployment gRPC server to [::]:0
            # unconditionally (ray/serve/_private/replica.py); nothing else may leave loopback.
            if not name.startswith("ray::ServeReplica"):
                exposed.append((name, conn.laddr))
    assert exposed == []


def _metric(url: str, name: str, replica: str) -> float | None:
    m = re.search(rf'{name}{{replica="{replica}"}} (\S+)', httpx.get(url + "/metrics", timeout=10).text)
    return float(m.group(1)) if m else None


def test_a_killed_replica_is_replaced_while_the_other_keeps_answering(served):
    import psutil

    victims = [p for p in _descendants(served.proc.pid) if psutil.pid_exists(p)
               and psutil.Process(p).name().startswith("ray::ServeReplica:qwenvl-replica-1")]
    assert len(victims) == 1
    os.kill(victims[0], signal.SIGKILL)

    async def burst():
        async with httpx.AsyncClient(base_url=served.url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=_chat()) for _ in range(6)))

    answers = asyncio.run(burst())
    # every request is answered: by replica-0, or by the new replica-1 once Serve has it up (a request the
    # dead one refuses before its first token is retried elsewhere)
    assert [r.status_code for r in answers] == [200] * 6
    assert "replica-0" in {r.headers["x-qwenvl-replica"] for r in answers}
    deadline = time.monotonic() + 90                 # Ray Serve starts a new replica-1, which loads the model
    while _metric(served.url, "qwenvl_replica_up", "replica-1") != 1.0 \
            or _metric(served.url, "qwenvl_replica_pid", "replica-1") == victims[0]:
        assert time.monotonic() < deadline, "replica-1 was not replaced"
        time.sleep(1)
    answers = asyncio.run(burst())
    assert [r.status_code for r in answers] == [200] * 6
    assert {r.headers["x-qwenvl-replica"] for r in answers} == {"replica-0", "replica-1"}


def test_sigterm_stops_the_command_and_every_ray_process_it_started(served):
    import psutil

    children = _descendants(served.proc.pid)
    assert any("raylet" in psutil.Process(p).name() for p in children if psutil.pid_exists(p))
    t0 = time.monotonic()
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(30) == 0
    assert time.monotonic() - t0 < 30
    deadline = time.monotonic() + 10
    while True:
        left = [p for p in children if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        left += [p.pid for p in psutil.process_iter(["cmdline"]) if any(served.raytmp in a for a in p.info["cmdline"] or [])]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert left == [], [psutil.Process(p).cmdline()[:2] for p in left if psutil.pid_exists(p)]
