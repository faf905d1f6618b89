"""How long plain chat requests take while another request's large JSON schema compiles (issue 38, s.1).

Starts `qwenvl serve` (the bundled model, CPU) from a source tree on 127.0.0.1, sends one request whose
response_format has N optional integer properties (its grammar compile takes seconds), waits a moment, then
8 plain "hi" requests at once, with the official openai SDK. Prints each plain request's latency and the
structured one's. Before the fix the compile ran on the engine thread and every plain request waited for it.

    .venv/bin/python bench/grammar_compile_stall.py                        # this tree
    .venv/bin/python bench/grammar_compile_stall.py --source /path/to/old  # another checkout (A/B)
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(ROOT), help="the checkout whose qwenvl to serve (default: this one)")
    ap.add_argument("--properties", type=int, default=1000, help="properties in the large schema (default: 1000, "
                    "the default --max-schema-properties)")
    ap.add_argument("--plain", type=int, default=8, help="plain requests sent during the compile")
    ap.add_argument("--delay", type=float, default=0.5, help="seconds between the large request and the plain ones")
    args = ap.parse_args()

    port = free_port()
    env = {**os.environ, "PYTHONPATH": args.source, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "qwenvl", "serve", "--port", str(port), "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=args.source, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                print("the server did not start", file=sys.stderr)
                return 1
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        hi = [{"role": "user", "content": "hi"}]
        client.chat.completions.create(model="qwenvl-bundled", messages=hi, max_tokens=4)     # warm up
        schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(args.properties)}}

        def timed(**kw):
            t0 = time.perf_counter()
            try:
                r = client.chat.completions.create(model="qwenvl-bundled", messages=hi, **kw)
                result = r.choices[0].finish_reason
            except openai.APIStatusError as e:
                result = f"HTTP {e.status_code}"
            return time.perf_counter() - t0, result

        t_alone = [timed(max_tokens=4)[0] for _ in range(3)]
        with ThreadPoolExecutor(args.plain) as pool:         # the same burst with nothing compiling
            burst = sorted(f.result()[0] for f in [pool.submit(timed, max_tokens=4) for _ in range(args.plain)])
        with ThreadPoolExecutor(args.plain + 1) as pool:
            big = pool.submit(timed, max_tokens=8, response_format={
                "type": "json_schema", "json_schema": {"name": "big", "schema": schema}})
            time.sleep(args.delay)
            plains = [pool.submit(timed, max_tokens=4) for _ in range(args.plain)]
            latencies = [f.result()[0] for f in plains]
            big_s, big_result = big.result()
        print(f"source {args.source}")
        print(f"plain request alone:           {' '.join(f'{t:.2f}' for t in t_alone)} s")
        print(f"{args.plain} plain requests at once:    {' '.join(f'{t:.2f}' for t in burst)} s (max {burst[-1]:.2f})")
        print(f"large schema ({args.properties} properties): {big_s:.2f} s ({big_result})")
        print(f"{args.plain} plain requests during it:  {' '.join(f'{t:.2f}' for t in sorted(latencies))} s "
              f"(max {max(latencies):.2f})")
        return 0
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
