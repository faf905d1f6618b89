"""Compiling qwenvl/kernels/csrc into a PyTorch extension, once per machine, on first use.

The sources are compiled by `torch.utils.cpp_extension.load` (g++ and ninja) into
~/.cache/qwenvl/kernels/<hash> (or $QWENVL_KERNELS_CACHE/<hash>), the hash covering the sources, the flags,
torch's and Python's versions: a later process with the same inputs imports the built module directly
(milliseconds), a change to any of them builds afresh. A build is announced with one line on stderr and
timed. Where it cannot happen (no compiler, a failed build) `load()` returns None with the cause, which the
package's face (qwenvl/kernels/__init__.py) turns into one warning.

To add an op family: its sources (one file per ISA, see csrc/int4_avx512.cpp) go into SOURCES, its entry
points into csrc/kernels.hpp's QWENVL_DECLARE_KERNELS, its Python bindings into csrc/bindings.cpp.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("bindings.cpp", "int4_avx512.cpp", "int4_avx2.cpp", "int8_avx512.cpp", "int8_avx2.cpp", "bf16_avx512.cpp",
           "bf16_avx2.cpp", "int8_rows.cpp",
           "decode_ops_bindings.cpp", "decode_ops_avx512.cpp", "decode_ops_avx2.cpp",
           "q4_k_tiles.cpp", "q6_k.cpp", "decode_stack.cpp")    # compiled; every csrc/*.hpp is hashed too
# No ISA flags here: each ISA's file sets its own target with a pragma, bindings.cpp stays baseline x86-64.
# -ffp-contract=off: no multiply-add is fused unless the source says so, so the arithmetic is what the
# reference (reference.py) describes.
# -fopenmp: at::parallel_for is inline in ATen's headers and splits work only where _OPENMP is defined;
# without it every product ran on the calling thread (measured: 24.5 GB/s with 1 and with 2 threads on a
# 17920 x 1536 int8 product, while F.linear went from 17 to 31 GB/s). The extension then shares torch's own
# libgomp (the same soname, already loaded), so torch.set_num_threads governs it too.
CFLAGS = ("-O3", "-std=c++17", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-Wall",
          "-Wno-unused-function")
LDFLAGS = ("-fopenmp",)
CACHE_ENV = "QWENVL_KERNELS_CACHE"

_lock = threading.Lock()
_loaded: tuple[object | None, str | None] | None = None       # (module, cause when None)


def source_hash() -> str:
    """The cache key: every source and header, the flags, torch's and Python's versions, the machine."""
    h = hashlib.sha256()
    for path in sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.hpp")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    for part in (*SOURCES, *CFLAGS, *LDFLAGS, torch.__version__, sys.version, platform.machine(), os.environ.get("CXX", "")):
        h.update(part.encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qwenvl" / "kernels"
    return Path(root) / source_hash()


def load() -> tuple[object | None, str | None]:
    """(the compiled module, None), or (None, why not); built at most once per process."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load()
        return _loaded


def _load() -> tuple[object | None, str | None]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"the kernels are written for x86-64, this machine is {platform.machine()}"
    directory = cache_dir()
    name = f"qwenvl_kernels_{directory.name}"
    built = directory / f"{name}.so"
    if built.exists() and not (directory / "lock").exists():
        try:
            return _import(name, built), None
        except ImportError as e:                 # a stale or broken file: build it again below
            print(f"qwenvl: rebuilding the CPU kernels ({e})", file=sys.stderr)
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return None, f"no C++ compiler ({compiler}) on PATH"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return None, f"the cache folder {directory} cannot be made ({e.strerror}); set {CACHE_ENV}"
    with open(directory / "build.flock", "w") as guard:
        # One builder per cache folder across processes. torch's own `lock` file outlives a builder that was
        # killed (Ctrl-C during the first build), and every later process would wait on it forever; holding
        # this flock (released by the kernel when its holder dies) proves no builder is alive, so a `lock`
        # found then is stale and removed.
        fcntl.flock(guard, fcntl.LOCK_EX)
        if built.exists() and not (directory / "lock").exists():     # another process built it meanwhile
            return _import(name, built), None
        (directory / "lock").unlink(missing_ok=True)
        return _compile(name, directory)


def _compile(name: str, directory: Path) -> tuple[object | None, str | None]:
    print(f"qwenvl: compiling the CPU kernels into {directory} (once per machine) ...", end="",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        from torch.utils import cpp_extension
        module = cpp_extension.load(name=name, sources=[str(CSRC / s) for s in SOURCES],
                                    extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS), build_directory=str(directory), verbose=False)
    except Exception as e:          # the compiler's, ninja's or the loader's error, whichever it is
        print(" failed", file=sys.stderr, flush=True)
        return None, f"the build failed: {_first_error(e)}"
    print(f" done in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return module, None


def _import(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _first_error(e: Exception) -> str:
    """The first line of a compiler's output that says 'error', else the exception's first line."""
    text = str(e)
    for line in text.splitlines():
        if "error" in line.lower() and line.strip():
            return line.strip()[:300]
    return (text.splitlines() or [type(e).__name__])[0][:300]
