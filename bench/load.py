"""Load test: N concurrent streaming clients against a real `qwenvl serve` for a fixed time.

    .venv/bin/python bench/load.py                      # bundled model, 64 clients, 120 s
    .venv/bin/python bench/load.py --tiny --clients 16 --duration 20
    .venv/bin/python bench/load.py --url http://127.0.0.1:8000 --api-key KEY   # an already running server

Unless --url is given, the server runs in a child process (`serve()`, the code path of `qwenvl serve`) so
that its RSS is its own. Each client loops: one streaming OpenAI chat request with a small image, read to
[DONE]. Prints requests completed, errors (must be 0), p50/p99 time to first token, and the server's RSS
and kv_blocks_used before and after (kv_blocks_used must return to its idle value: no leaked blocks).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def _image_url() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (96, 64), (30, 120, 200)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(m.group(1)) / 1024 if m else None


def _kv_used(url: str) -> float | None:
    try:
        text = httpx.get(url + "/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    m = re.search(r"^qwenvl_engine_kv_blocks_used ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else None


async def _client(url: str, headers: dict, body: dict, stop_at: float, ttfts: list, errors: list, done: list):
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as http:
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            first = None
            try:
                async with http.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
                    if r.status_code != 200:
                        errors.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                        continue
                    finished = False
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            finished = True
                            break
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            errors.append(chunk["error"]["message"])
                            break
                        if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                            first = time.perf_counter() - t0
                    if finished:
                        done.append(time.perf_counter() - t0)
                        if first is not None:
                            ttfts.append(first)
            except httpx.HTTPError as e:
                errors.append(f"{type(e).__name__}: {e}")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _start_server(args) -> tuple[subprocess.Popen, str, str | None]:
    model = args.model
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import make_checkpoint

        model = str(make_checkpoint(tempfile.mkdtemp(prefix="qwenvl-load-"), "qwen2_vl"))
    port = _free_port()
    code = ("import sys; from qwenvl.server.cli import serve; from qwenvl.server.settings import ServerSettings; "
            f"sys.exit(serve(ServerSettings(model={model!r}, port={port}, max_queue={args.clients * 2}, "
            f"dtype={args.dtype!r}, device={args.device!r}), engine_options={{'kv_cache_gb': {args.kv_cache_gb}}}, "
            "mount_ui=False))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url, None
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start in 600 s")


async def _run(args, url: str, headers: dict, duration: float) -> tuple[list, list, list, float]:
    content = [{"type": "text", "text": args.prompt}]
    if not args.no_image:
        content.insert(0, {"type": "image_url", "image_url": {"url": _image_url()}})
    body = {"model": "qwenvl", "stream": True, "max_tokens": args.max_tokens, "temperature": 0.7,
            "messages": [{"role": "user", "content": content}]}
    ttfts, errors, done = [], [], []
    t0 = time.monotonic()
    stop_at = t0 + duration
    await asyncio.gather(*(_client(url, headers, body, stop_at, ttfts, errors, done) for _ in range(args.clients)))
    return ttfts, errors, done, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=120.0, help="seconds clients keep starting requests")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt", default="Describe the image.")
    ap.add_argument("--no-image", action="store_true")
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random qwen2_vl checkpoint (needs tests/tiny.py)")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kv-cache-gb", type=float, default=0.5)
    ap.add_argument("--warmup", type=float, default=60.0,
                    help="seconds of the same load before the 'before' reading: thread pools, allocator "
                         "arenas and oneDNN's per-shape kernel cache fill once, a leak keeps growing")
    ap.add_argument("--url", default=None, help="use a running server instead of starting one")
    ap.add_argument("--api-key", default=os.environ.get("QWENVL_API_KEY"))
    args = ap.parse_args()

    proc = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        proc, url, _ = _start_server(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    pid = proc.pid if proc else None
    rss_start = _rss_mb(pid)
    try:
        if args.warmup > 0:
            _, warm_errors, _, _ = asyncio.run(_run(args, url, headers, args.warmup))
            time.sleep(0.5)
        rss0, kv0 = _rss_mb(pid), _kv_used(url)
        ttfts, errors, done, wall = asyncio.run(_run(args, url, headers, args.duration))
        errors = (warm_errors if args.warmup > 0 else []) + errors
        time.sleep(0.5)                          # let the engine thread publish its last stats
        rss1, kv1 = _rss_mb(pid), _kv_used(url)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    print(f"clients {args.clients}  duration {wall:.1f} s  max_tokens {args.max_tokens}")
    print(f"requests completed {len(done)}  ({len(done) / wall:.2f}/s)")
    print(f"errors {len(errors)}" + (f"  first: {errors[0]}" if errors else ""))
    print(f"time to first token p50 {_pct(ttfts, 0.5) * 1000:.0f} ms  p99 {_pct(ttfts, 0.99) * 1000:.0f} ms")
    print(f"request latency p50 {_pct(done, 0.5) * 1000:.0f} ms  p99 {_pct(done, 0.99) * 1000:.0f} ms")
    fmt = lambda v, unit="": "n/a" if v is None else f"{v:.0f}{unit}"  # noqa: E731
    print(f"server RSS at start {fmt(rss_start, ' MB')}, after {args.warmup:.0f} s warm-up (before) "
          f"{fmt(rss0, ' MB')}  after {fmt(rss1, ' MB')}"
          + (f"  growth {100 * (rss1 - rss0) / rss0:+.1f}%" if rss0 and rss1 else ""))
    print(f"kv_blocks_used before {fmt(kv0)}  after {fmt(kv1)}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
