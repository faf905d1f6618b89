"""qwenvl against llama.cpp on the same weights: batch-1 decode and prefill tokens/s, one run.

    .venv/bin/python bench/vs_llamacpp.py                  # build (once), convert (once), measure, print the table
    .venv/bin/python bench/vs_llamacpp.py --build-only     # just fetch and build llama.cpp

1. llama.cpp is built once under runs/llamacpp/ from the `llama-cpp-python` source package on PyPI (its
   sdist vendors llama.cpp under vendor/llama.cpp): `pip download --no-binary :all: --no-deps`, a small
   idempotent patch (see `patch_amx_tile_config`), then cmake: Release, CPU only, -march=native, the
   tools llama-bench and llama-quantize (and llama-server, for bench/vs_llama_server.py).
2. The language model of bench/throughput.py's random-weight Qwen2-VL-2B-widths checkpoint is converted
   to GGUF with the converter from that same source tree (`convert_hf_to_gguf.py` + the `gguf` package):
   BF16, then `llama-quantize` to Q8_0 and Q4_K_M. Converted once, cached beside the build. The bench's
   tokenizer is a 400-token BPE with Qwen2's pre-tokenizer; the converter names pre-tokenizers by hashing a
   test string's tokens, does not know this vocabulary's hash, and is told "qwen2" (see `converter_child`).
3. Measured in this one run: the machine's bandwidth (throughput.py's tensor copy), then for each pair
   (bf16 / BF16, int8 / Q8_0, int4 / Q4_K_M, and gguf / Q4_K_M: qwenvl running llama.cpp's own Q4_K_M file
   with the projector converted beside it) back to back: llama.cpp's `llama-bench` decode (tg) and
   prefill (pp), and qwenvl's batch-1 decode and text prefill of the same lengths in a child process of its
   own. Same thread count on both sides (torch's); the best of --repeats runs on both sides. Two tables:
   llama.cpp tok/s, qwenvl tok/s, ratio; and each side's decode as a fraction of its read roofline
   (bandwidth / bytes of weights read per token, which differ: Q4_K_M keeps some tensors in Q6_K).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))       # throughput.py's builder and helpers, imported

HOME = ROOT / "runs" / "llamacpp"
PACKAGE = "llama-cpp-python"
TOOLS = ("llama-bench", "llama-quantize", "llama-server")    # llama-server: bench/vs_llama_server.py
GGUF_TYPES = ("BF16", "Q8_0", "Q4_K_M")
# which qwenvl mode stands beside which GGUF type (same bits per weight, or as close as the formats get)
# "gguf": qwenvl running llama.cpp's own Q4_K_M file (with the projector converted beside it), issue 39
PAIRS = (("bf16", "BF16"), ("int8", "Q8_0"), ("int4", "Q4_K_M"), ("gguf", "Q4_K_M"))
AMX_MARKER = "qwenvl bench/vs_llamacpp.py: keep the tile config stores"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_logged(cmd: list[str], log_file: Path) -> None:
    """Runs a tool with its (long) output in log_file; a failure raises with the log's tail."""
    with open(log_file, "w") as f:
        res = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    if res.returncode != 0:
        tail = log_file.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{' '.join(cmd)} failed (exit {res.returncode}); the end of {log_file}:\n{tail}")


# --------------------------------------------------------------------------- llama.cpp: source and build
def source_tree(home: Path, version: str | None) -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist: downloaded from PyPI once (or the pinned version),
    extracted beside it."""
    home.mkdir(parents=True, exist_ok=True)
    pattern = f"llama_cpp_python-{version}.tar.gz" if version else "llama_cpp_python-*.tar.gz"
    sdists = sorted(home.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not sdists:
        spec = f"{PACKAGE}=={version}" if version else PACKAGE
        log(f"downloading the {spec} source package from PyPI ...")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        "--no-cache-dir", "-d", str(home), spec], check=True,
                       stdout=subprocess.DEVNULL)
        sdists = sorted(home.glob(pattern), key=lambda p: p.stat().st_mtime)
        if not sdists:
            raise SystemExit(f"pip download left no {pattern} in {home}")
    sdist = sdists[-1]
    root = home / sdist.name.removesuffix(".tar.gz")
    tree = root / "vendor" / "llama.cpp"
    if not (tree / "CMakeLists.txt").exists():
        log(f"extracting {sdist.name} ...")
        with tarfile.open(sdist) as tar:
            tar.extractall(home, filter="data")
        if not (tree / "CMakeLists.txt").exists():
            raise SystemExit(f"{sdist.name} has no vendor/llama.cpp/CMakeLists.txt; not the layout this script knows")
    return tree


def patch_amx_tile_config(text: str) -> str:
    """ggml's AMX kernels fill a local 64-byte tile_config_t and hand its address to `_tile_loadconfig`. In
    GCC 12's amxtileintrin.h that is an asm whose memory operand is `*(const void **)config`: the compiler
    sees only the first 8 bytes read, may drop the stores of the rows / column widths as dead, and LDTILECFG
    then loads an unconfigured palette, so the first AMX Q8_0 tile instruction crashes (seen on Intel CPUs
    with AMX; GCC 12.2 at -O3 -march=sapphirerapids emits only the zeroing and the palette id before
    LDTILECFG). An empty asm with a memory clobber before the call keeps every store. Idempotent: a second
    call returns the text unchanged; a source without the call is a ValueError."""
    if AMX_MARKER in text:
        return text
    call = "    _tile_loadconfig(&tc);\n"
    start = text.find("ggml_tile_config_init(void)")
    at = text.find(call, start) if start >= 0 else -1
    if at < 0:
        raise ValueError("ggml_tile_config_init's `_tile_loadconfig(&tc);` not found")
    barrier = (f"    // {AMX_MARKER}: GCC 12's _tile_loadconfig tells the compiler it reads 8 bytes of tc\n"
               "    __asm__ __volatile__(\"\" ::: \"memory\");\n")
    return text[:at] + barrier + text[at:]


def apply_amx_patch(tree: Path) -> None:
    path = tree / "ggml" / "src" / "ggml-cpu" / "amx" / "mmq.cpp"
    if not path.exists():
        log(f"note: {path.relative_to(tree)} is not in this llama.cpp; no AMX patch needed")
        return
    text = path.read_text()
    try:
        patched = patch_amx_tile_config(text)
    except ValueError as e:
        log(f"warning: AMX patch not applied ({e}); only matters on a CPU with AMX built with GCC 12")
        return
    if patched != text:
        path.write_text(patched)
        log("patched ggml-cpu/amx/mmq.cpp (compiler barrier before _tile_loadconfig)")


def ensure_build_tools() -> None:
    """cmake and a C++ compiler; installed with apt-get where missing and allowed (root)."""
    missing = [t for t in ("cmake", "c++", "make") if shutil.which(t) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise SystemExit(f"missing build tools {missing}: install cmake and a C++ compiler (build-essential)")
    log(f"installing cmake build-essential with apt-get (missing: {', '.join(missing)}) ...")
    subprocess.run(["apt-get", "update"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "cmake", "build-essential"], check=True, stdout=subprocess.DEVNULL)


def build_llamacpp(tree: Path, build: Path, jobs: int) -> Path:
    """Release, CPU only, -march=native (GGML_NATIVE), static; only the tools the bench runs. Once: a stamp
    names the source it was built from."""
    stamp = build / "BUILT_FROM"
    bin_dir = build / "bin"
    source = str(tree.resolve())
    if stamp.exists() and stamp.read_text() == source and all((bin_dir / t).exists() for t in TOOLS):
        return bin_dir
    ensure_build_tools()
    apply_amx_patch(tree)
    t0 = time.perf_counter()
    log(f"building llama.cpp ({', '.join(TOOLS)}) in {build} with -j{jobs}; about five minutes on two cores ...")
    configure = ["cmake", "-S", str(tree), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                 "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON"]
    build.mkdir(parents=True, exist_ok=True)
    run_logged(configure, build / "configure.log")
    run_logged(["cmake", "--build", str(build), "--config", "Release", "-j", str(jobs), "--target", *TOOLS],
               build / "build.log")
    stamp.write_text(source)
    log(f"  built in {time.perf_counter() - t0:.0f} s")
    return bin_dir


# --------------------------------------------------------------------------- GGUF conversion
# Qwen2's pre-tokenizer split, as in Qwen2-VL's tokenizer.json (and bench/throughput.py's small BPE one).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer_is_qwen2(tokenizer_json: dict) -> bool:
    """True when the tokenizer splits text with Qwen2's regex before its byte-level BPE. llama.cpp's converter
    names the pre-tokenizer by hashing the tokens of a test string, so a Qwen2-style tokenizer with another
    vocabulary (the bench's 400-token one) is "not recognized"; this says that "qwen2" is still the truth."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [s for s in steps if s.get("type") == "Split"]
    return (len(splits) == 1 and splits[0].get("pattern", {}).get("Regex") == QWEN2_SPLIT
            and any(s.get("type") == "ByteLevel" for s in steps))


def converter_child(tree: Path, pre: str, argv: list[str]) -> None:
    """Runs the tree's convert_hf_to_gguf.py in this process. With `pre` set, a tokenizer whose test-string
    hash the converter does not know gets that pre-tokenizer name instead of NotImplementedError (known
    hashes keep their own answer). The converter puts the tree's own gguf-py first on sys.path, as
    upstream runs it: the `gguf` on PyPI (0.19.0 today) lags the tree and lacks what this converter uses."""
    import runpy
    sys.path[:0] = [str(tree), str(tree / "gguf-py")]
    if pre:
        from conversion.base import TextModel          # the converter's own package, from the tree
        known = TextModel.get_vocab_base_pre

        def get_vocab_base_pre(self, tokenizer) -> str:
            try:
                return known(self, tokenizer)
            except NotImplementedError:
                return pre
        TextModel.get_vocab_base_pre = get_vocab_base_pre
    if "--mmproj" in argv:
        accept_transformers5_vision_keys()
    script = str(tree / "convert_hf_to_gguf.py")
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")


def accept_transformers5_vision_keys() -> None:
    """transformers 5 saves Qwen2-VL's tower as `model.visual.*` (4.x: `visual.*`); this converter's
    Qwen2VLVisionModel keeps only names starting with `visual.` and would write an mmproj file with no
    tensors. Strip the `model.` first, in the converter's own process (its language-model side already
    strips `language_model.`)."""
    from conversion.qwenvl import Qwen2VLVisionModel
    keep = Qwen2VLVisionModel.filter_tensors.__func__

    def filter_tensors(cls, item):
        name, gen = item
        return keep(cls, (name.removeprefix("model.") if name.startswith("model.visual.") else name, gen))
    Qwen2VLVisionModel.filter_tensors = classmethod(filter_tensors)


def convert(checkpoint: Path, tree: Path, bin_dir: Path, out: Path) -> dict[str, Path]:
    """checkpoint -> {GGUF type: path}: BF16 by the converter (the language model only; the vision tower
    would be a separate --mmproj file), Q8_0 and Q4_K_M by llama-quantize from the BF16 file. Each file is
    written under a temporary name and renamed when complete, so a cached one is always whole."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {t: out / f"{t}.gguf" for t in GGUF_TYPES}
    if not paths["BF16"].exists():
        tok = checkpoint / "tokenizer.json"
        pre = "qwen2" if tok.exists() and pre_tokenizer_is_qwen2(json.loads(tok.read_text())) else ""
        t0 = time.perf_counter()
        log(f"converting {checkpoint} to GGUF BF16 ..."
            + (" (pre-tokenizer: qwen2 where the hash is unknown)" if pre else ""))
        part = paths["BF16"].with_suffix(".part")
        run_logged([sys.executable, __file__, "--converter-child", str(tree), pre, "--",
                    str(checkpoint), "--outtype", "bf16", "--outfile", str(part)], out / "convert.log")
        part.rename(paths["BF16"])
        log(f"  converted in {time.perf_counter() - t0:.0f} s")
    for t in GGUF_TYPES[1:]:
        if paths[t].exists():
            continue
        t0 = time.perf_counter()
        log(f"llama-quantize BF16 -> {t} ...")
        part = paths[t].with_suffix(".part")
        run_logged([str(bin_dir / "llama-quantize"), str(paths["BF16"]), str(part), t], out / f"quantize-{t}.log")
        part.rename(paths[t])
        log(f"  quantised in {time.perf_counter() - t0:.0f} s")
    paths["mmproj"] = out / "mmproj-BF16.gguf"
    if not paths["mmproj"].exists():       # the vision projector, for qwenvl's run of the GGUF itself
        tok = checkpoint / "tokenizer.json"
        pre = "qwen2" if tok.exists() and pre_tokenizer_is_qwen2(json.loads(tok.read_text())) else ""
        part = paths["mmproj"].with_suffix(".part")
        run_logged([sys.executable, __file__, "--converter-child", str(tree), pre, "--", str(checkpoint),
                    "--mmproj", "--outtype", "bf16", "--outfile", str(part)], out / "convert-mmproj.log")
        part.rename(paths["mmproj"])
    return paths


def convert_pair(tree: Path, checkpoint: Path, out_dir: Path, outtype: str = "f32") -> tuple[Path, Path]:
    """(language model GGUF, mmproj GGUF) of `checkpoint` by the tree's converter, both runs side by side in
    child processes (tests/test_gguf.py and bench/gguf_load.py use this)."""
    lm, mmproj = out_dir / f"{checkpoint.name}-{outtype}.gguf", out_dir / f"mmproj-{checkpoint.name}-{outtype}.gguf"
    tok = checkpoint / "tokenizer.json"
    pre = "qwen2" if tok.exists() and pre_tokenizer_is_qwen2(json.loads(tok.read_text())) else ""
    runs = []
    for out, extra in ((lm, []), (mmproj, ["--mmproj"])):
        cmd = [sys.executable, __file__, "--converter-child", str(tree), pre, "--", str(checkpoint),
               "--outtype", outtype, "--outfile", str(out), *extra]
        runs.append((out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    for out, proc in runs:
        output, _ = proc.communicate()
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"the converter failed for {out.name}:\n{output[-3000:]}")
    return lm, mmproj


def convert_mmproj(checkpoint: Path, tree: Path, out: Path) -> Path:
    """checkpoint's vision tower -> out/mmproj-F16.gguf by the same converter (`--mmproj`): llama-server's
    `--mmproj` file, with the `clip.*` keys. F16, the type llama.cpp's own mmproj files ship in. The converter
    maps the merger's `mlp.{i}` only for i below the tower's depth, so a tower needs depth >= 3."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "mmproj-F16.gguf"
    if path.exists():
        return path
    t0 = time.perf_counter()
    log(f"converting {checkpoint}'s vision tower to GGUF (--mmproj, F16) ...")
    part = out / "mmproj-F16.part"
    run_logged([sys.executable, __file__, "--converter-child", str(tree), "", "--",
                str(checkpoint), "--mmproj", "--outtype", "f16", "--outfile", str(part)], out / "convert-mmproj.log")
    # the converter may add "mmproj-" to a name it is given; take whichever file it wrote
    written = part if part.exists() else next(iter(out.glob("*mmproj*.part")), None)
    if written is None:
        raise SystemExit(f"the --mmproj conversion wrote no file in {out}; see {out / 'convert-mmproj.log'}")
    if not gguf_tensors(written):
        raise SystemExit(f"the --mmproj conversion of {checkpoint} wrote no tensors; see {out / 'convert-mmproj.log'}")
    written.rename(path)
    log(f"  converted in {time.perf_counter() - t0:.0f} s")
    return path


def bytes_read_per_token(tensors: list[tuple[str, int]]) -> int:
    """Bytes of the GGUF tensors a decode step reads: all of them, except that a separate `output.weight`
    leaves the token embedding to a one-row lookup (tied embeddings: token_embd IS the output head)."""
    names = {name for name, _ in tensors}
    skip = {"token_embd.weight"} if "output.weight" in names else set()
    return sum(n for name, n in tensors if name not in skip)


def gguf_tensors(path: Path) -> list[tuple[str, int]]:
    """(name, bytes) of every tensor in a GGUF file, read with the `gguf` package."""
    from gguf import GGUFReader
    return [(t.name, int(t.n_bytes)) for t in GGUFReader(path).tensors]


# --------------------------------------------------------------------------- llama.cpp side
def parse_llama_bench(records: list[dict]) -> dict:
    """llama-bench's `-o json` records -> {"prefill": tok/s, "decode": tok/s, "build": commit, "threads": n}.
    A pp test has n_gen 0, a tg test n_prompt 0; samples_ts holds one tok/s per repetition, and the best one
    is taken (on a shared machine a neighbour only ever slows a repetition down; qwenvl's side does the same)."""
    out = {}
    for r in records:
        best = max(float(x) for x in r.get("samples_ts") or [r["avg_ts"]])
        if r.get("n_gen", 0) == 0 and r.get("n_prompt", 0) > 0:
            out["prefill"] = best
        elif r.get("n_prompt", 0) == 0 and r.get("n_gen", 0) > 0:
            out["decode"] = best
    if not {"prefill", "decode"} <= set(out):
        raise ValueError(f"llama-bench gave no pp and tg records: {records!r}")
    out["build"] = str(records[0].get("build_commit", "?"))
    out["threads"] = int(records[0].get("n_threads", 0))
    return out


def run_llama_bench(bin_dir: Path, gguf: Path, a) -> dict[str, float]:
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(a.threads), "-p", str(a.prompt_tokens),
           "-n", str(a.decode_tokens), "-r", str(a.repeats), "-o", "json"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return parse_llama_bench(json.loads(res.stdout))


# --------------------------------------------------------------------------- qwenvl side (a child per mode)
def prompt_of_length(llm, n: int):
    """A text conversation whose prompt (chat template included) is at least n tokens, and its length:
    words of throughput.py's corpus, added until the engine's own tokenisation reaches n."""
    from throughput import CORPUS
    words = " ".join(CORPUS).split()
    k = 1
    while True:
        conv = [{"role": "user", "content": " ".join(words[i % len(words)] for i in range(k))}]
        count = len(llm.engine.prepare(conv).token_ids)
        if count >= n:
            return conv, count
        k += max(1, (n - count) // 2)


def side_qwenvl(checkpoint: Path, mode: str, a) -> dict:
    """What llama-bench measures, through the engine: batch-1 decode of --decode-tokens after a short prompt
    (tokens / time from the first token to the last) and prefill of a text prompt of about --prompt-tokens
    (tokens / time to first token; prefix caching off, so every run prefills it all); each the best of
    --repeats runs, after one run of each off the clock."""
    import torch
    from qwenvl import LLM

    from throughput import compute_dtype, decode_weight_bytes, stream_request
    torch.set_num_threads(a.threads)
    if mode == "gguf":        # llama.cpp's Q4_K_M file and the projector, each tensor in its own type
        llm = LLM(a.gguf_model, mmproj=a.gguf_mmproj, dtype=compute_dtype(a), kv_cache_gb=a.kv_cache_gb,
                  enable_prefix_caching=False)
    else:
        llm = LLM(str(checkpoint), dtype=compute_dtype(a), kv_cache_gb=a.kv_cache_gb, enable_prefix_caching=False,
                  quantization=None if mode == "bf16" else mode)
    short = [{"role": "user", "content": "Describe the picture."}]
    decode = []
    for _ in range(a.repeats + 1):
        _, times, _ = stream_request(llm, short, a.decode_tokens + 1)
        decode.append(a.decode_tokens / (times[-1] - times[0]))
    conv, n = prompt_of_length(llm, a.prompt_tokens)
    prefill = [n / stream_request(llm, conv, 1)[0] for _ in range(a.repeats + 1)]
    return {"decode": max(decode[1:]), "prefill": max(prefill[1:]), "prompt_tokens": n,
            "weight_bytes": decode_weight_bytes(llm.engine.model)}


def run_child(checkpoint: Path, mode: str, ggufs: dict[str, Path] | None = None) -> dict:
    files = ["--gguf-model", str(ggufs["Q4_K_M"]), "--gguf-mmproj", str(ggufs["mmproj"])] if mode == "gguf" else []
    cmd = [sys.executable, __file__, "--child", mode, "--checkpoint", str(checkpoint), *files] + \
          [x for x in sys.argv[1:] if x not in ("--build-only",)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"the qwenvl {mode} child failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report
def read_bandwidth(gib: float = 1.0, repeats: int = 7) -> float:
    """Bytes/s of the best of `repeats` maxima over a float32 tensor of `gib` GiB: a read-only pass, what a
    decode step does with its weights, with one cheap vector max per 64 bytes so that the loads, not the
    arithmetic, set the pace (33-50 GB/s here between runs of a shared machine; a bf16 sum ~31). throughput.py's
    copy counts a read and a write, and a copy also reads each destination line before writing it, so it
    understates what a pure read reaches (llama.cpp's BF16 decode read faster than that copy here)."""
    import torch
    x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    x.amax()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.amax()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def pair_row(mode: str, gtype: str, rounds: list[tuple[dict, dict]], llama_bytes: int) -> dict:
    """One table row from --rounds (llama.cpp, qwenvl) measurements: each side's median, and the median of
    the per-round ratios (each round's two sides ran minutes apart at most)."""
    def median_of(side: int, key: str) -> float:
        return statistics.median(r[side][key] for r in rounds)
    row = {"mode": mode, "gguf": gtype, "llama_bytes": llama_bytes,
           "llama": {**rounds[0][0], "decode": median_of(0, "decode"), "prefill": median_of(0, "prefill")},
           "qwenvl": {**rounds[0][1], "decode": median_of(1, "decode"), "prefill": median_of(1, "prefill")}}
    for key in ("decode", "prefill"):
        row[f"{key}_ratios"] = [q[key] / l[key] for l, q in rounds]
    return row


def report(rows: list[dict], bandwidth: float, copy: float, a) -> None:
    n = sorted({r["qwenvl"]["prompt_tokens"] for r in rows})
    print(f"\nbest of {a.repeats} runs each; {a.threads} threads each side; ratio = qwenvl / llama.cpp"
          + (f"; {a.rounds} alternating rounds: medians, and the median of the per-round ratios" if a.rounds > 1 else ""))
    print(f"read roofline = {bandwidth / 1e9:.1f} GB/s (best max over a 1 GiB float32 tensor, this run) / bytes of "
          f"weights read per token; throughput.py's 1 GiB copy (read+write): {copy / 1e9:.1f} GB/s")
    head = f"{'llama.cpp':>11s}{'qwenvl':>9s}{'ratio':>8s}"
    print(f"\n  {'decode tok/s, batch 1':24s}{head}{'GB/token l.cpp':>16s}{'qwenvl':>8s}"
          f"{'roofline l.cpp':>16s}{'qwenvl':>8s}")
    for r in rows:
        ld, qd, lb, qb = r["llama"]["decode"], r["qwenvl"]["decode"], r["llama_bytes"], r["qwenvl"]["weight_bytes"]
        label = f"{r['mode']} / {r['gguf']}"
        ratio = statistics.median(r["decode_ratios"])
        print(f"  {label:24s}{ld:11.2f}{qd:9.2f}{ratio:7.2f}x{lb / 1e9:16.2f}{qb / 1e9:8.2f}"
              f"{100 * ld * lb / bandwidth:15.0f}%{100 * qd * qb / bandwidth:7.0f}%")
    print(f"\n  {'prefill tok/s':24s}{head}")
    for r in rows:
        lp, qp = r["llama"]["prefill"], r["qwenvl"]["prefill"]
        label = f"{r['mode']} / {r['gguf']}"
        print(f"  {label:24s}{lp:11.1f}{qp:9.1f}{statistics.median(r['prefill_ratios']):7.2f}x")
    if a.rounds > 1:
        print("\n  per-round decode ratios: " + "; ".join(
            f"{r['mode']} " + " ".join(f"{x:.2f}" for x in r["decode_ratios"]) for r in rows))
    print(f"\n  llama.cpp: llama-bench tg{a.decode_tokens} and pp{a.prompt_tokens} (random tokens); qwenvl: "
          f"{a.decode_tokens} tokens after a short prompt, and a text prompt of {', '.join(map(str, n))} tokens "
          "(chat template included) to its first token")


def main() -> None:
    if len(sys.argv) > 3 and sys.argv[1] == "--converter-child":
        tree, pre, rest = Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
        converter_child(tree, pre, rest[1:] if rest[:1] == ["--"] else rest)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None,
                   help="a Qwen2-VL checkpoint (default: throughput.py's runs/bench_qwen2vl_2b, built if missing)")
    p.add_argument("--llamacpp-home", default=str(HOME), help="where the sdist, the build and the GGUF files go")
    p.add_argument("--llamacpp-version", default=None, help="llama-cpp-python version (default: cached, else newest)")
    p.add_argument("--build-only", action="store_true", help="fetch and build llama.cpp, then stop")
    p.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compile jobs")
    p.add_argument("--threads", type=int, default=None, help="threads of each side (default: torch's count)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="llama-bench -r, and qwenvl's runs of each (best taken)")
    p.add_argument("--rounds", type=int, default=1, help="alternations of each llama.cpp / qwenvl pair (medians)")
    p.add_argument("--kv-cache-gb", type=float, default=0.2)
    p.add_argument("--modes", default="bf16,int8,int4,gguf", help="comma-separated, of " + ", ".join(m for m, _ in PAIRS))
    # bfloat16, not qwenvl's "auto": the comparison is with llama.cpp's BF16 on the same weights, and auto's
    # one-off bf16-vs-fp32 probe can pick float32 on a busy machine (it did once here: 6.2 GB a token)
    p.add_argument("--dtype", default="bfloat16", choices=("auto", "bfloat16", "float32"),
                   help="qwenvl's compute dtype")
    p.add_argument("--child", choices=[m for m, _ in PAIRS], help=argparse.SUPPRESS)
    p.add_argument("--gguf-model", help=argparse.SUPPRESS)
    p.add_argument("--gguf-mmproj", help=argparse.SUPPRESS)
    a = p.parse_args()
    import torch
    if a.threads is None:
        a.threads = torch.get_num_threads()
    checkpoint = Path(a.checkpoint) if a.checkpoint else default_checkpoint()
    if a.child:
        print(json.dumps(side_qwenvl(checkpoint, a.child, a)))
        return

    home = Path(a.llamacpp_home)
    tree = source_tree(home, a.llamacpp_version)
    source = tree.parent.parent.name               # llama_cpp_python-<version>: builds and GGUFs per version
    bin_dir = build_llamacpp(tree, home / "build" / source, a.jobs)
    if a.build_only:
        print(bin_dir)
        return
    pairs = [(m, g) for m, g in PAIRS if m in a.modes.split(",")]
    if not pairs:
        raise SystemExit(f"--modes {a.modes!r}: none of {', '.join(m for m, _ in PAIRS)}")
    ggufs = convert(checkpoint, tree, bin_dir, home / "gguf" / source / checkpoint.resolve().name)

    from throughput import copy_bandwidth
    started = time.perf_counter()
    torch.set_num_threads(a.threads)
    copy, bandwidth = copy_bandwidth(), read_bandwidth()
    rows = []
    for mode, gtype in pairs:       # each pair back to back, so that a noisy neighbour hits both sides alike
        rounds = []
        for r in range(a.rounds):   # and --rounds alternations of the pair: this VM's speed drifts by minutes
            log(f"round {r + 1}/{a.rounds}: measuring llama.cpp {gtype} ...")
            llama = run_llama_bench(bin_dir, ggufs[gtype], a)
            log(f"round {r + 1}/{a.rounds}: measuring qwenvl {mode} ...")
            rounds.append((llama, run_child(checkpoint, mode, ggufs)))
        rows.append(pair_row(mode, gtype, rounds, bytes_read_per_token(gguf_tensors(ggufs[gtype]))))
    print(f"checkpoint {checkpoint}; llama.cpp {rows[0]['llama']['build']} from {source} "
          f"(llama-bench -t {rows[0]['llama']['threads']} -r {a.repeats}); "
          f"measured in {time.perf_counter() - started:.0f} s")
    report(rows, bandwidth, copy, a)


def default_checkpoint() -> Path:
    """bench/throughput.py's Qwen2-VL-2B-widths random checkpoint, built by its own builder if missing."""
    from throughput import build_checkpoint, checkpoint_dir
    dims = argparse.Namespace(dir=None, hidden=1536, text_layers=28, heads=12, kv_heads=2, intermediate=8960,
                              vocab=151936, vision_depth=32, vision_width=1280)     # throughput.py's defaults
    path = checkpoint_dir(dims)
    if not (path / "BENCH_COMPLETE").exists():
        log(f"building the random checkpoint in {path} (bench/throughput.py's builder) ...")
        build_checkpoint(path, dims)
    return path


if __name__ == "__main__":
    main()
