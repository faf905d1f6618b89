"""qwenvl's server against llama.cpp's `llama-server` on the same weights, measured the way users see it:
many streaming clients sending images through the official `openai` SDK.

    .venv/bin/python bench/vs_llama_server.py                        # the defaults below (~12 min here)
    .venv/bin/python bench/vs_llama_server.py --modes bf16,int8 --concurrency 1,4,16,32   # everything (~1 h)
    .venv/bin/python bench/vs_llama_server.py --models bundled --modes bf16 --concurrency 1,4 --requests 8
    .venv/bin/python bench/vs_llama_server.py --sides qwenvl ...     # one side only (profiling the engine)

1. llama.cpp: bench/vs_llamacpp.py's build (the llama-cpp-python sdist, its AMX patch, cmake; llama-server is
   among its tools), or an existing build's bin folder with --llamacpp-bin. The checkpoint's language model is
   converted by that tree's convert_hf_to_gguf.py (BF16, then llama-quantize to Q8_0) and its vision tower
   with `--mmproj` (F16, llama.cpp's usual type for it), once, cached under --llamacpp-home.
2. Models: the bundled one (tiny: the numbers show the server and scheduler cost) and bench/throughput.py's
   random Qwen2-VL with 2B widths, 8 text and 8 vision layers (--text-layers 28 --vision-depth 32 for the real
   depth). By default the bundled model runs bf16 and int8 at 1, 4, 16 and 32 clients, the 2B one int8 at 1
   and 16 clients (issue 37's rows), so the whole run stays under 15 minutes on a 2-core machine: llama-server
   alone needs ~6 min for 16 clients on the 2B model and ~12 for 32. --modes / --concurrency apply to every
   model when given.
3. Per model, mode (qwenvl bf16 / llama.cpp BF16, qwenvl int8 / Q8_0) and concurrency: both servers on
   127.0.0.1 with the same thread count, one after the other (qwenvl first), each fed the same seeded workload
   (bench/serving_workload.py: 1-2 images of 12, 10-60 word questions, max_tokens from {16, 64, 256} with
   ignore_eos, 30% second turns) by `concurrency` closed-loop clients, streamed, after one warm-up request.
   Each phase gets its own image pool (seed + concurrency), so no cache carries over from the phase before.
   llama-server is started per concurrency with that many slots (-np) of --slot-context tokens each;
   qwenvl's server once per model and mode.
4. Per phase and side: requests/s, output tokens/s, TTFT p50/p99, inter-token latency p50/p99 (gaps between
   streamed chunks that carry tokens: requests ask for `logprobs`, so a token with no text of its own, common
   from random weights whose 151936-row head outruns the bench's 400-token vocabulary, still arrives as a
   chunk on both sides), peak RSS of the server process during the phase (VmHWM, reset through
   /proc/PID/clear_refs before it), how many requests were answered with exactly max_tokens tokens, and for
   qwenvl that its KV blocks are back to 0 after the phase (its /metrics). A table and a JSON file.

Threads: --threads (default: the cores torch sees) for both: qwenvl as a ceiling, llama-server through -t and
-tb. Without --threads qwenvl's own choice stands (`qwenvl serve` serves a model under 64 MiB of weights, the
bundled one, on one thread: cli/openmp.py); with it, OMP_NUM_THREADS=N for qwenvl. Images: llama-server gets the checkpoint's min/max pixels as --image-min-tokens /
--image-max-tokens, so both sides see the same prompt tokens (the table's "prompt tok" shows it).
qwenvl runs with `qwenvl serve`'s own latency caps (cli/serving_defaults.py: 64 prompt tokens and 1024 vision rows
a decoding step, 256 / 8192 for the bundled model); --prefill-cap N / --vision-rows N set them, 0 turns them off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import serving_workload as wl          # noqa: E402  (bench/ on the path first)
import vs_llamacpp as lc               # noqa: E402

# qwenvl mode -> llama.cpp GGUF type on the same weights (int4 / Q4_K_M: --modes int4, not in the default run)
PAIRS = {"bf16": "BF16", "int8": "Q8_0", "int4": "Q4_K_M"}
BUNDLED = ROOT / "qwenvl" / "assets" / "bundled"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- server processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_peak_kb(pid: int) -> int | None:
    """VmHWM (peak resident set) of a process in kB, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmHWM:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def reset_rss_peak(pid: int) -> bool:
    """Start a new peak: writing 5 to clear_refs sets VmHWM to the current RSS (Linux >= 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class Server:
    """One server process on 127.0.0.1 with its output in a log file; stopped by its own pid."""

    def __init__(self, name: str, cmd: list[str], port: int, log_file: Path, env: dict | None = None):
        self.name, self.port, self.log_file = name, port, log_file
        self.url = f"http://127.0.0.1:{port}"
        with open(log_file, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def wait_ready(self, path: str, timeout_s: float = 600) -> None:
        import httpx
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_file.read_text(errors="replace")[-3000:]
                raise SystemExit(f"{self.name} exited with {self.proc.returncode}; the end of {self.log_file}:\n{tail}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"{self.name} was not ready after {timeout_s:.0f} s; see {self.log_file}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def image_token_limits(checkpoint: Path) -> tuple[int, int]:
    """(min, max) merged tokens per image from the checkpoint's preprocessor_config.json: llama-server is
    told the same (--image-min-tokens / --image-max-tokens), or its own defaults resize images larger."""
    pre = json.loads((checkpoint / "preprocessor_config.json").read_text())
    unit = (pre.get("patch_size", 14) * pre.get("merge_size", 2)) ** 2
    return max(1, pre["min_pixels"] // unit), pre["max_pixels"] // unit


def kv_cache_gb(checkpoint: Path, tokens: int) -> float:
    """qwenvl's KV memory for `tokens` tokens in bfloat16: as many as llama-server's slots x slot context."""
    cfg = json.loads((checkpoint / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    per_token = text["num_hidden_layers"] * text["num_key_value_heads"] * head_dim * 2 * 2     # K and V, 2 bytes
    return round(per_token * tokens / (1 << 30) + 0.01, 2)


def start_qwenvl(model_dir: Path, mode: str, a, log_dir: Path) -> Server:
    port = free_port()
    kv = a.kv_cache_gb or kv_cache_gb(model_dir, max(a.levels) * a.slot_context)
    cmd = [sys.executable, "-m", "qwenvl", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "bfloat16", "--metrics-public", "--served-model-name", "bench",
           "--max-queue", "1024", "--kv-cache-gb", str(kv)]
    if mode != "bf16":
        cmd += ["--quantization", mode]
    if a.prefill_cap is not None:
        cmd += ["--max-prefill-tokens-while-decoding", str(a.prefill_cap)]
    if a.vision_rows is not None:
        cmd += ["--vision-rows-per-step", str(a.vision_rows)]
    # a ceiling only: without --threads the server picks its count up to the cores (cli/openmp.py)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads)) if a.threads_given else dict(os.environ)
    server = Server("qwenvl", cmd, port, log_dir / f"qwenvl-{model_dir.name}-{mode}.log", env)
    server.wait_ready("/health")
    return server


def start_llama(bin_dir: Path, gguf: Path, mmproj: Path, slots: int, a, log_file: Path,
                image_tokens: tuple[int, int]) -> Server:
    port = free_port()
    cmd = [str(bin_dir / "llama-server"), "-m", str(gguf), "--mmproj", str(mmproj), "--host", "127.0.0.1",
           "--port", str(port), "-t", str(a.threads), "-tb", str(a.threads), "-np", str(slots),
           "-c", str(slots * a.slot_context), "--no-webui", "--alias", "bench",
           "--image-min-tokens", str(image_tokens[0]), "--image-max-tokens", str(image_tokens[1])]
    server = Server("llama-server", cmd, port, log_file)
    server.wait_ready("/health")
    return server


def qwenvl_kv_blocks_used(url: str) -> int | None:
    import httpx
    text = httpx.get(url + "/metrics", timeout=10).text
    m = re.search(r"^qwenvl_engine_kv_blocks_used(?:\{[^}]*\})?\s+([0-9.e+]+)", text, re.M)
    return int(float(m.group(1))) if m else None


def wait_kv_free(url: str, timeout_s: float = 10) -> int | None:
    """KV blocks in use after a phase, polled until 0 (the engine frees them on the step after the last
    token) or the timeout."""
    deadline = time.monotonic() + timeout_s
    used = qwenvl_kv_blocks_used(url)
    while used and time.monotonic() < deadline:
        time.sleep(0.2)
        used = qwenvl_kv_blocks_used(url)
    return used


# --------------------------------------------------------------------------- clients
async def one_request(client, messages: list[dict], max_tokens: int) -> wl.Record:
    rec = wl.Record(sent=time.perf_counter(), max_tokens=max_tokens)
    try:
        stream = await client.chat.completions.create(
            model="bench", messages=messages, max_tokens=max_tokens, temperature=0, stream=True, logprobs=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                choice = chunk.choices[0]
                if (choice.delta and choice.delta.content) or (choice.logprobs and choice.logprobs.content):
                    rec.chunk_times.append(now)
                if choice.finish_reason:
                    rec.finish_reason = choice.finish_reason
            if chunk.usage:
                rec.completion_tokens = chunk.usage.completion_tokens
                rec.prompt_tokens = chunk.usage.prompt_tokens
    except Exception as e:  # noqa: BLE001 - a failed request is a result ("nothing lost" counts them)
        rec.error = f"{type(e).__name__}: {str(e)[:200]}"
    return rec


async def run_phase(url: str, workload: list[wl.BenchRequest], urls: list[str], concurrency: int) -> tuple[list, float]:
    """`concurrency` closed-loop clients take the workload's requests in order; (records, wall seconds)."""
    import httpx
    import openai
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 4), timeout=1800)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, http_client=http)
    records: list = [None] * len(workload)
    next_i = iter(range(len(workload)))

    async def worker():
        for i in next_i:
            req = workload[i]
            records[i] = await one_request(client, wl.messages(req, workload, urls), req.max_tokens)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await http.aclose()
    return records, wall


def measure(server: Server, side: str, workload, urls, concurrency: int) -> dict:
    warm = wl.BenchRequest(-1, (0,), "Describe the image.", 4)
    asyncio.run(run_phase(server.url, [warm], urls[:1], 1))            # one-time costs off the clock
    reset = reset_rss_peak(server.proc.pid)
    records, wall = asyncio.run(run_phase(server.url, workload, urls, concurrency))
    row = wl.summarize(records, wall)
    peak = rss_peak_kb(server.proc.pid)
    row.update(side=side, concurrency=concurrency, peak_rss_mb=peak / 1024 if peak else None,
               rss_peak_is_phase=reset)
    if side == "qwenvl":
        row["kv_blocks_after"] = wait_kv_free(server.url)
    return row


# --------------------------------------------------------------------------- models
def bench_checkpoint(a) -> Path:
    """bench/throughput.py's random Qwen2-VL with 2B widths and --text-layers / --vision-depth layers."""
    from throughput import build_checkpoint, checkpoint_dir
    dims = argparse.Namespace(dir=None, hidden=1536, text_layers=a.text_layers, heads=12, kv_heads=2,
                              intermediate=8960, vocab=151936, vision_depth=a.vision_depth, vision_width=1280)
    path = checkpoint_dir(dims)
    if not (path / "BENCH_COMPLETE").exists():
        log(f"building the random checkpoint in {path} (bench/throughput.py's builder) ...")
        build_checkpoint(path, dims)
    return path


def llama_files(checkpoint: Path, tree: Path, bin_dir: Path, home: Path, source: str) -> tuple[dict, Path]:
    out = home / "gguf" / source / checkpoint.resolve().name
    return lc.convert(checkpoint, tree, bin_dir, out), lc.convert_mmproj(checkpoint, tree, out)


# --------------------------------------------------------------------------- report
COLUMNS = [("req/s", "req_per_s", "{:.2f}"), ("out tok/s", "out_tok_per_s", "{:.1f}"),
           ("TTFT p50", "ttft_p50_ms", "{:.0f}"), ("TTFT p99", "ttft_p99_ms", "{:.0f}"),
           ("ITL p50", "itl_p50_ms", "{:.1f}"), ("ITL p99", "itl_p99_ms", "{:.1f}"),
           ("peak RSS MB", "peak_rss_mb", "{:.0f}"), ("prompt tok", "prompt_tokens_mean", "{:.0f}")]


def fmt(value, pattern: str) -> str:
    return "-" if value is None or value != value else pattern.format(value)


def table(rows: list[dict]) -> str:
    """Markdown: one line per model, mode, concurrency and side; ms for latencies."""
    head = ["model", "mode", "clients", "side"] + [c for c, _, _ in COLUMNS] + ["answered", "KV after"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["mode"], str(r["concurrency"]), r["side"]]
        cells += [fmt(r.get(k), p) for _, k, p in COLUMNS]
        cells += [f"{r['exact_length']}/{r['requests']}", fmt(r.get("kv_blocks_after"), "{}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(rows: list[dict]) -> list[str]:
    """qwenvl / llama-server per phase: output tok/s and req/s (higher is better), TTFT p99 (lower)."""
    out = []
    by = {(r["model"], r["mode"], r["concurrency"], r["side"]): r for r in rows}
    for (model, mode, c, side), q in by.items():
        l = by.get((model, mode, c, "llama-server"))
        if side != "qwenvl" or l is None or not l["out_tok_per_s"]:
            continue
        out.append(f"{model} {mode} c={c}: out tok/s x{q['out_tok_per_s'] / l['out_tok_per_s']:.2f}, "
                   f"req/s x{q['req_per_s'] / l['req_per_s']:.2f}, TTFT p99 {q['ttft_p99_ms']:.0f} vs "
                   f"{l['ttft_p99_ms']:.0f} ms, ITL p99/p50 {q['itl_p99_ms'] / q['itl_p50_ms']:.1f}")
    return out


# --------------------------------------------------------------------------- main
# Per model, the modes and client counts run when --modes / --concurrency are not given.
DEFAULTS = {"bundled": ("bf16,int8", "1,4,16,32"), "2b": ("int8", "1,16")}


def model_plan(model: str, a) -> tuple[list[str], list[int]]:
    """(modes, client counts) to run for `model`: --modes / --concurrency where given, else DEFAULTS."""
    if model not in DEFAULTS:
        raise SystemExit(f"--models: {model!r} is not one of {list(DEFAULTS)}")
    modes = [m for m in (a.modes or DEFAULTS[model][0]).split(",") if m]
    if bad := [m for m in modes if m not in PAIRS]:
        raise SystemExit(f"--modes: {bad} not among {list(PAIRS)}")
    return modes, [int(c) for c in (a.concurrency or DEFAULTS[model][1]).split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="bundled,2b", help="comma list of bundled, 2b")
    p.add_argument("--modes", default=None, help="comma list of " + ", ".join(PAIRS) + " (default: per model, "
                   + "; ".join(f"{m} {d[0]}" for m, d in DEFAULTS.items()) + ")")
    p.add_argument("--concurrency", default=None, help="comma list of client counts (default: per model, "
                   + "; ".join(f"{m} {d[1]}" for m, d in DEFAULTS.items()) + ")")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per phase (default: max(8, 2 x clients) for the bundled model, "
                        "max(6, clients + clients // 2) for 2b)")
    p.add_argument("--sides", default="qwenvl,llama-server", help="comma list of qwenvl, llama-server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="threads of each server (default: torch's count)")
    p.add_argument("--text-layers", type=int, default=8, help="2b model: language model layers (28: full)")
    p.add_argument("--vision-depth", type=int, default=8, help="2b model: vision tower blocks (32: full)")
    p.add_argument("--kv-cache-gb", type=float, default=None,
                   help="qwenvl's KV cache (default: room for as many tokens as llama-server's largest -c)")
    p.add_argument("--prefill-cap", type=int, default=None,
                   help="qwenvl's --max-prefill-tokens-while-decoding (default: the server's own, by model size; "
                        "0: no cap)")
    p.add_argument("--vision-rows", type=int, default=None,
                   help="qwenvl's --vision-rows-per-step (default: the server's own, by model size; 0: each image "
                        "whole in one step)")
    p.add_argument("--slot-context", type=int, default=4096, help="llama-server's context per slot (-c = slots x this)")
    p.add_argument("--llamacpp-home", default=str(lc.HOME), help="sdist, build and GGUF files (vs_llamacpp.py's)")
    p.add_argument("--llamacpp-bin", default=None, help="an existing llama.cpp build's bin folder (skips the build)")
    p.add_argument("--llamacpp-version", default=None)
    p.add_argument("--gguf-home", default=None, help="where converted GGUF files go (default: --llamacpp-home)")
    p.add_argument("--jobs", type=int, default=os.cpu_count())
    p.add_argument("--out", default=str(ROOT / "runs" / "vs_llama_server"), help="logs and results.json")
    a = p.parse_args()
    import torch
    a.threads_given = a.threads is not None
    a.threads = a.threads or torch.get_num_threads()
    sides = a.sides.split(",")
    plans = {model: model_plan(model, a) for model in a.models.split(",")}
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    home = Path(a.llamacpp_home)
    if "llama-server" in sides:
        tree = lc.source_tree(home, a.llamacpp_version)
        source = tree.parent.parent.name
        bin_dir = Path(a.llamacpp_bin) if a.llamacpp_bin else lc.build_llamacpp(tree, home / "build" / source, a.jobs)
        if not (bin_dir / "llama-server").exists():
            raise SystemExit(f"no llama-server in {bin_dir}")

    rows: list[dict] = []
    started = time.perf_counter()
    for model, (modes, levels) in plans.items():
        a.levels = levels
        checkpoint = BUNDLED if model == "bundled" else bench_checkpoint(a)
        if "llama-server" in sides:
            ggufs, mmproj = llama_files(checkpoint, tree, bin_dir, Path(a.gguf_home or home), source)
        for mode in modes:
            qwenvl = start_qwenvl(checkpoint, mode, a, out_dir) if "qwenvl" in sides else None
            try:
                for c in levels:
                    n = a.requests or (max(8, 2 * c) if model == "bundled" else max(6, c + c // 2))
                    workload = wl.make_workload(n, a.seed + c)
                    urls = [wl.png_data_url(img) for img in wl.image_pool(a.seed + c)]
                    for side in sides:
                        log(f"{model} {mode} c={c} {side}: {n} requests ...")
                        if side == "qwenvl":
                            row = measure(qwenvl, side, workload, urls, c)
                        else:
                            server = start_llama(bin_dir, ggufs[PAIRS[mode]], mmproj, c, a,
                                                 out_dir / f"llama-{model}-{mode}-c{c}.log",
                                                 image_token_limits(checkpoint))
                            try:
                                row = measure(server, side, workload, urls, c)
                            finally:
                                server.stop()
                        row.update(model=model, mode=mode)
                        rows.append(row)
                        log(f"  {row['answered']}/{row['requests']} answered, {row['out_tok_per_s']:.1f} out tok/s, "
                            f"TTFT p99 {row['ttft_p99_ms']:.0f} ms, ITL p50/p99 {row['itl_p50_ms']:.1f}/"
                            f"{row['itl_p99_ms']:.1f} ms" + (f", errors {row['errors']}" if row["errors"] else ""))
            finally:
                if qwenvl is not None:
                    qwenvl.stop()
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"threads {a.threads}; seed {a.seed}; slot context {a.slot_context}; 2b = {a.text_layers} text / {a.vision_depth} vision layers; "
          f"measured in {time.perf_counter() - started:.0f} s; latencies in ms")
    print(table(rows))
    for line in ratios(rows):
        print("  " + line)
    lost = [r for r in rows if r["exact_length"] != r["requests"] or r.get("kv_blocks_after")]
    if lost:
        print(f"NOT CLEAN: {len(lost)} phase(s) lost requests, answered short, or left KV blocks in use")


if __name__ == "__main__":
    main()
