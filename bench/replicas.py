"""Throughput of `qwenvl serve --replicas N` against one in-process engine, on this machine.

    .venv/bin/python bench/replicas.py                          # bundled model; in-process, 1 and 2 replicas
    .venv/bin/python bench/replicas.py --model DIR --replicas 1 2 4 --requests 48

Each configuration is a real `qwenvl serve` child process (started, warmed with one request, measured,
stopped with SIGTERM, one after the other): `--requests` chat requests, each with its own small image and a
question, `--concurrency` at a time, greedy, `--max-tokens` each. It prints generated tokens/s and requests/s
per configuration and the ratio to the in-process server measured in the same run. On a CPU the replicas
share its cores (Ray gives each replica cores/N, and torch uses that many threads), so the ratio shows what
routing through Ray costs and what running engines side by side gains there; on a machine with a GPU per
replica it is the scale-out.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image(i: int) -> str:
    img = Image.new("RGB", (112, 112), ((i * 53) % 256, (i * 97) % 256, (i * 31) % 256))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _body(i: int, max_tokens: int) -> dict:
    return {"model": "m", "max_tokens": max_tokens, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _image(i)}}, {"type": "text", "text": "What is in the image?"}]}]}


async def _measure(url: str, n: int, concurrency: int, max_tokens: int) -> tuple[float, int]:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one(i: int) -> int:
            async with gate:
                r = await client.post("/v1/chat/completions", json=_body(i, max_tokens))
                r.raise_for_status()
                return r.json()["usage"]["completion_tokens"]

        await one(10_000)                                   # warm-up, off the clock
        t0 = time.perf_counter()
        tokens = await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - t0, sum(tokens)


def run(replicas: int, args) -> tuple[float, int]:
    port = _free_port()
    cmd = [sys.executable, "-m", "qwenvl", "serve", "--port", str(port), "--device", "cpu"]
    if args.model:
        cmd += ["--model", args.model]
    if replicas:
        cmd += ["--replicas", str(replicas), "--ray-object-store-mb", "200"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"{' '.join(cmd)} did not start")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        return asyncio.run(_measure(url, args.requests, args.concurrency, args.max_tokens))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: the bundled model)")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args()
    print(f"cores {os.cpu_count()}, load {os.getloadavg()[0]:.2f}; {args.requests} requests, {args.concurrency} at a "
          f"time, {args.max_tokens} max tokens, model {args.model or 'bundled'}")
    base = None
    for n in [0, *args.replicas]:
        seconds, tokens = run(n, args)
        rate = tokens / seconds
        base = base or rate
        label = "in-process" if n == 0 else f"{n} replica(s)"
        print(f"{label:>14}: {tokens / seconds:7.1f} generated tokens/s, {args.requests / seconds:5.2f} requests/s "
              f"({seconds:.1f} s)  x{rate / base:.2f} of in-process")


if __name__ == "__main__":
    main()
