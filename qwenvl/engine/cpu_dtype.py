"""Which floating-point type to compute in on a CPU, decided by timing this CPU rather than by its name.

bfloat16 halves the bytes each weight costs and, on CPUs with native bfloat16 dot products (AVX512-BF16,
AMX, Arm's BF16 extension), runs matrix products several times faster than float32. On a CPU without
them PyTorch has no fast kernel: on an AVX2-only EPYC we measured the probe product below 11-16x slower
in bfloat16 than in float32 (a 2048-square one ~400x), and a small Qwen2-VL 4x slower end to end
(bench/README.md). Most laptops are such CPUs, so "auto" must look before it picks.
"""

from __future__ import annotations

import functools
import logging
import time

import torch

log = logging.getLogger("qwenvl.engine")

# A product shaped like a small model's prefill (256 tokens through a 512 x 512 layer): big enough that a
# fast kernel's start-up cost does not hide its speed, small enough that the probe takes ~0.1 s where
# bfloat16 is slow.
PROBE_TOKENS, PROBE_WIDTH = 256, 512


def _seconds(x: torch.Tensor, w: torch.Tensor, reps: int = 3) -> float:
    """Best of `reps` timings of x @ w.T (after one untimed product that builds the kernel)."""
    torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t)
    return best


def bfloat16_slowdown() -> float:
    """How many times longer the probe product takes in bfloat16 than in float32 on this CPU."""
    x, w = torch.randn(PROBE_TOKENS, PROBE_WIDTH), torch.randn(PROBE_WIDTH, PROBE_WIDTH)
    return _seconds(x.bfloat16(), w.bfloat16()) / _seconds(x, w)


# The two kinds of CPU sit far apart (native bfloat16: the probe runs 2-4x FASTER in bf16; without: 11x and
# more slower), while one timing on a busy shared machine moves by tens of percent: a float32 pick on a
# native-bf16 CPU was seen at a measured ratio just above 1. Only a clear slowdown means "no fast bf16".
SLOW_BFLOAT16_RATIO = 2.0


@functools.lru_cache(maxsize=None)
def cpu_bfloat16_is_fast() -> bool:
    """True unless this CPU multiplies bfloat16 matrices clearly slower than float32 ones (measured once)."""
    fast = bfloat16_slowdown() < SLOW_BFLOAT16_RATIO
    if not fast:
        log.info("this CPU has no fast bfloat16 matrix products: computing in float32 "
                 "(ask for dtype='bfloat16' to override)")
    return fast


def auto_cpu_dtype() -> torch.dtype:
    """bfloat16 where this CPU runs it fast, float32 elsewhere."""
    return torch.bfloat16 if cpu_bfloat16_is_fast() else torch.float32
