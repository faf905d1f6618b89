"""The per-token path through the HTTP server on the bundled model (issue 37): streamed text requests from
`clients` closed-loop openai-SDK clients, inter-token latency and throughput, for one or more server settings
side by side, in alternating rounds (the machine this was written on is shared: A/B in the same run is what
to read).

    .venv/bin/python bench/serving_http.py                                   # int8, 1 and 32 clients, as-is
    .venv/bin/python bench/serving_http.py --configs "GOMP_SPINCOUNT=;GOMP_SPINCOUNT=10000" --clients 1,32
    .venv/bin/python bench/serving_http.py --configs "base=" --clients 1 --profile runs/itl   # + py-spy

`--configs`: a `;`-separated list of environment settings for the server process, each `NAME=value,...`
(`NAME=` with nothing after it: unset). Every config gets its own `qwenvl serve` on 127.0.0.1 (bundled
model, --quantization int8 unless --quantization none); all are started first, then each round runs every
config's phase at every client count, the order of the configs swapped every round. A phase: `requests`
requests (default max(8, 2 x clients)) of a short text question each, `max_tokens` drawn from --max-tokens
(16, 64 or 256, seeded by round and client count: the same for every config) with `ignore_eos`, temperature 0, `logprobs` on (as bench/vs_llama_server.py's clients ask: every token arrives as
a chunk). Per config and client count, medians over rounds: requests/s, output tokens/s, TTFT p50/p99, ITL
p50/p99 (ms), and that every request came back with exactly max_tokens tokens.

`--profile DIR`: the first round's phases run under `py-spy record --native --threads` attached to the server
(py-spy from the venv), one collapsed-stack file per config and client count in DIR; `--gil`: only the samples
of the thread holding the GIL (who keeps the others waiting).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import serving_workload as wl                     # noqa: E402
from vs_llama_server import Server, free_port, one_request as stream_request  # noqa: E402

QUESTION = ("Describe a red square on a white page with a small table, a bar chart and three lines of text; "
            "say what the title could be.")


def start(name: str, env_changes: dict, a, log_dir: Path) -> Server:
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    for k, v in env_changes.items():
        if v == "":
            env.pop(k, None)
        else:
            env[k] = v
    port = free_port()
    cmd = [sys.executable, "-m", "qwenvl", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "bfloat16", "--metrics-public", "--served-model-name", "bench", "--max-queue", "1024",
           "--kv-cache-gb", "0.5"]
    if a.quantization != "none":
        cmd += ["--quantization", a.quantization]
    server = Server(name, cmd, port, log_dir / f"serving_http-{len(list(log_dir.glob('serving_http-*')))}.log", env)
    server.wait_ready("/health")
    return server


async def one_request(client, question: str, max_tokens: int) -> wl.Record:
    """One streamed text question, timed chunk by chunk (vs_llama_server.py's request with a text message)."""
    return await stream_request(client, [{"role": "user", "content": question}], max_tokens)


async def phase(url: str, clients: int, requests: int, max_tokens: list[int], tag: str) -> tuple[list, float]:
    import httpx
    import openai
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4), timeout=600)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, http_client=http)
    records: list = [None] * requests
    todo = iter(range(requests))

    async def worker():
        for i in todo:
            records[i] = await one_request(client, f"{tag} {i}: {QUESTION}", lengths[i])

    await one_request(client, f"warm-up {tag}", 4)
    lengths = random.Random(tag).choices(max_tokens, k=requests)       # the same draw for every config
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
    await http.aclose()
    return records, wall


def parse_configs(text: str) -> list[tuple[str, dict]]:
    out = []
    for part in text.split(";"):
        env = {}
        for item in filter(None, (x.strip() for x in part.split(","))):
            k, _, v = item.partition("=")
            env[k.strip()] = v.strip()
        out.append((part.strip() or "as-is", env))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="", help="';'-separated server environments, e.g. 'A=1;A='")
    p.add_argument("--clients", default="1,32")
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--max-tokens", default="16,64,256", help="comma list; each request draws one (seeded)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="the server's OMP_NUM_THREADS (default: all cores)")
    p.add_argument("--quantization", default="int8", help="int8, int4 or none")
    p.add_argument("--profile", default=None, help="folder for py-spy profiles (collapsed stacks) of the first round")
    p.add_argument("--gil", action="store_true", help="--profile: only samples of threads holding the GIL")
    p.add_argument("--out", default=str(ROOT / "runs" / "serving_http"))
    a = p.parse_args()
    a.threads = a.threads or os.cpu_count()
    lengths = [int(x) for x in a.max_tokens.split(",")]
    configs = parse_configs(a.configs)
    levels = [int(c) for c in a.clients.split(",")]
    log_dir = Path(a.out)
    log_dir.mkdir(parents=True, exist_ok=True)
    servers = [(name, start(name, env, a, log_dir)) for name, env in configs]
    rows: dict[tuple[str, int], list[dict]] = {}
    try:
        for r in range(a.rounds):
            order = servers if r % 2 == 0 else servers[::-1]
            for c in levels:
                for name, server in order:
                    n = a.requests or max(8, 2 * c)
                    spy = None
                    if a.profile and r == 0:
                        Path(a.profile).mkdir(parents=True, exist_ok=True)
                        stacks = Path(a.profile) / f"{name.replace('=', '_').replace(',', '_') or 'as-is'}-c{c}.txt"
                        spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record",
                                                *(["--gil"] if a.gil else []),
                                                "--native", "--threads", "--format", "raw", "-o", str(stacks), "--pid",
                                                str(server.proc.pid)], stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL)
                        time.sleep(1.0)
                    records, wall = asyncio.run(phase(server.url, c, n, lengths, f"r{r}c{c}"))
                    if spy is not None:
                        spy.send_signal(2)
                        spy.wait(timeout=60)
                    row = wl.summarize(records, wall)
                    rows.setdefault((name, c), []).append(row)
                    print(f"round {r} {name} c={c}: {row['out_tok_per_s']:.1f} tok/s, ITL p50/p99 "
                          f"{row['itl_p50_ms']:.2f}/{row['itl_p99_ms']:.2f} ms, exact {row['exact_length']}/{n}",
                          file=sys.stderr, flush=True)
    finally:
        for _, server in servers:
            server.stop()
    cols = [("req/s", "req_per_s", "{:.2f}"), ("tok/s", "out_tok_per_s", "{:.1f}"),
            ("TTFT p50", "ttft_p50_ms", "{:.1f}"), ("TTFT p99", "ttft_p99_ms", "{:.1f}"),
            ("ITL p50", "itl_p50_ms", "{:.2f}"), ("ITL p99", "itl_p99_ms", "{:.2f}")]
    print(f"bundled model, {a.quantization}, server threads {a.threads}, max_tokens {a.max_tokens}, "
          f"medians over {a.rounds} rounds; ms")
    print("| config | clients | " + " | ".join(c for c, _, _ in cols) + " | exact |")
    print("|---|---|" + "---|" * len(cols) + "---|")
    for (name, c), rs in rows.items():
        cells = [pat.format(statistics.median(x[key] for x in rs)) for _, key, pat in cols]
        exact = f"{sum(x['exact_length'] for x in rs)}/{sum(x['requests'] for x in rs)}"
        print(f"| {name} | {c} | " + " | ".join(cells) + f" | {exact} |")


if __name__ == "__main__":
    main()
