"""GGUF test files made by llama.cpp's own converter, and quantised copies of them.

The converter is `convert_hf_to_gguf.py` from the llama-cpp-python source package (it vendors llama.cpp),
downloaded once per machine into ~/.cache/qwenvl/llama-cpp-python (QWENVL_LLAMACPP_CACHE overrides) by
bench/vs_llamacpp.py's `source_tree` and run by its `converter_child`. A machine that cannot reach the
package registry skips these tests; nothing else does.

llama-quantize is not built here (6 minutes), so quantised files are written by rewriting the converter's
F32 file with the `gguf` package (bench/gguf_rewrite.py: gguf's own quantiser for Q8_0 / Q4_0 / Q5_0, and
small ones for Q4_K and Q6_K, which gguf dequantises but does not quantise).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vs_llamacpp = _bench_module("vs_llamacpp")
_rewrite = _bench_module("gguf_rewrite")
rewrite, dequantised_copy, quantize_q4_k = _rewrite.rewrite, _rewrite.dequantised_copy, _rewrite.quantize_q4_k


def cache_dir() -> Path:
    return Path(os.environ.get("QWENVL_LLAMACPP_CACHE", Path.home() / ".cache" / "qwenvl" / "llama-cpp-python"))


def converter_tree() -> Path:
    """vendor/llama.cpp of the cached sdist; downloaded on first use, a skip when the registry is unreachable."""
    try:
        return vs_llamacpp.source_tree(cache_dir(), None)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"llama-cpp-python's source package could not be downloaded (registry unreachable?): {e}")


def convert(checkpoint: Path, out_dir: Path, outtype: str = "f32") -> tuple[Path, Path]:
    """(language model GGUF, mmproj GGUF) of `checkpoint`, by the real converter."""
    return vs_llamacpp.convert_pair(converter_tree(), checkpoint, out_dir, outtype)
