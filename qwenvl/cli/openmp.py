"""libgomp's idle spinning and thread count for `qwenvl serve`, chosen before torch loads libgomp (issue 37).

After each parallel region, PyTorch's OpenMP worker threads spin (GOMP's default: ~300,000 turns) before
they sleep. A server has more busy threads than that: the engine thread, the event loop, tokenising and
image-decoding threads, and the clients on the same machine. Spinning workers take cores from them: on the
bundled model a batch-1 decode step took 43 ms (median) with the default spin and 6.8 ms with 10,000 turns on
a loaded 2-core VM (bench/gomp_spin.py), and a quiet run of bench/vs_llama_server.py had 1-client output
tokens/s 299 -> 358, inter-token latency p50 2.7 -> 1.9 ms. A 2B model's batch-1 decode alone on a quiet
machine neither gains nor loses (int8: 79.57 against 79.69 ms a step, bench/gomp_spin.py --rounds 2); only
the server sets it, where other threads compete for the cores.

libgomp reads GOMP_SPINCOUNT once, when it is loaded, so the server entry sets it before torch is imported;
a user's own GOMP_SPINCOUNT, or OMP_WAIT_POLICY (which sets the spinning another way), is left as it is.
Child processes (replica workers, tensor-parallel ranks) inherit it.

A small model (its weight files under SMALL_MODEL_BYTES, the bundled one among them) is served on one OpenMP
thread, unless the user set OMP_NUM_THREADS: each of its operations is microseconds of work, so a second
thread adds a wake-up and a barrier to every one and takes a core from the event loop and the clients. Quiet
2-core VM, bundled model, int8, bench/vs_llama_server.py --sides qwenvl: 1 client 266 -> 380 output tokens/s
(inter-token p50 2.7 -> 1.7 ms), 32 clients 813 -> 964, with 2 threads -> 1.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

SPIN_ENV = "GOMP_SPINCOUNT"
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
SERVER_SPIN_COUNT = "10000"
THREADS_ENV = "OMP_NUM_THREADS"
SMALL_MODEL_BYTES = 64 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
BUNDLED_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "bundled"   # the engine's, without torch


def quiet_spinning(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set GOMP_SPINCOUNT to SERVER_SPIN_COUNT unless the user chose the spinning; whether it was set."""
    if SPIN_ENV in environ or WAIT_POLICY_ENV in environ:
        return False
    environ[SPIN_ENV] = SERVER_SPIN_COUNT
    return True


def one_thread_for_a_small_model(model: str | None, environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set OMP_NUM_THREADS=1 for a local checkpoint (folder or GGUF file; None: the bundled model) whose weight
    files total under SMALL_MODEL_BYTES, unless the user chose the count; whether it was set. A Hub id or an
    Ollama name is not measured here and keeps torch's count."""
    if THREADS_ENV in environ:
        return False
    size = local_weight_bytes(model)
    if size is None or size >= SMALL_MODEL_BYTES:
        return False
    environ[THREADS_ENV] = "1"
    return True


def local_weight_bytes(model: str | None) -> int | None:
    """Bytes of a local checkpoint's weight files, or None where `model` is not a local folder or weight file."""
    path = BUNDLED_MODEL_DIR if model is None else Path(model).expanduser()
    if path.is_file():
        return path.stat().st_size if path.suffix in WEIGHT_SUFFIXES else None
    if not path.is_dir():
        return None
    sizes = [p.stat().st_size for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()]
    return sum(sizes) if sizes else None
