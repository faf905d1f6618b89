"""Back the loaded weights with 2 MiB pages (Linux transparent huge pages, `MADV_COLLAPSE`).

Why: a batch-1 decode step streams every weight once. With 4 KiB pages that is ~400,000 pages per token
at 2B widths, each a TLB miss and a page walk. On the 2-core Zen 4 VM, int8 decode at 2B widths ran 1.11x
faster (median of 6 alternate rounds, every round faster) with the weights on 2 MiB pages
(`bench/huge_pages.py`).

The weights live wherever their allocators put them: PyTorch's tensors, and fbgemm's packed matrices in
glibc's heap, whose addresses PyTorch does not expose. So this works on the process's own memory map:
every 2 MiB-aligned stretch of private anonymous memory whose pages are all resident is collapsed in
place. All resident only, so that no page is added and the resident size stays what it was (a collapse
fills a stretch's absent pages). Most systems ship THP in "madvise" mode, where nothing is huge unless
asked for; `MADV_COLLAPSE` (Linux 6.1+) asks synchronously, whatever that mode.

It costs a copy of the memory at load: 3 GB took 8 s on that VM. So it is asked for, not default:
`QWENVL_HUGE_PAGES=1` makes the engine collapse the model right after loading it (before the KV pool,
which decode reads little of). Where the kernel lacks it or refuses (another OS, an old kernel, THP
"never", fragmented memory), the process keeps its 4 KiB pages: only the speed-up is lost.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import sys
import time
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

ENV = "QWENVL_HUGE_PAGES"
HUGE_PAGE = 2 << 20
_PAGE = 4096
_MADV_COLLAPSE = 25


@dataclass
class CollapseReport:
    collapsed_bytes: int = 0
    refused_bytes: int = 0
    seconds: float = 0.0
    reason: str = ""            # why nothing was tried, if so


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    return libc


def anonymous_regions(maps_text: str) -> list[tuple[int, int]]:
    """(start, end) of the private, writable, anonymous mappings (the heap included) in /proc/<pid>/maps text."""
    out = []
    for line in maps_text.splitlines():
        fields = line.split()
        if len(fields) < 5 or "-" not in fields[0]:
            continue
        path = fields[5] if len(fields) > 5 else ""
        if fields[1].startswith("rw") and fields[1].endswith("p") and fields[4] == "0" and path in ("", "[heap]"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end))
    return out


def resident_huge_stretches(libc, start: int, end: int) -> list[tuple[int, int]]:
    """The 2 MiB-aligned runs inside [start, end) whose pages are all resident, merged where adjacent."""
    first, last = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE
    if last <= first:
        return []
    n_pages = (last - first) // _PAGE
    vec = (ctypes.c_ubyte * n_pages)()
    if libc.mincore(first, last - first, vec) != 0:
        return []
    # bit 0 of each byte: that page is resident (the other bits are reserved)
    full = (torch.frombuffer(vec, dtype=torch.uint8) & 1).view(-1, HUGE_PAGE // _PAGE).all(dim=1)
    runs: list[tuple[int, int]] = []
    for i in full.nonzero().flatten().tolist():
        a = first + i * HUGE_PAGE
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], a + HUGE_PAGE)
        else:
            runs.append((a, a + HUGE_PAGE))
    return runs


def requested() -> bool:
    """Whether the environment asks for the model on 2 MiB pages (`QWENVL_HUGE_PAGES=1`)."""
    value = os.environ.get(ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{ENV}={value!r}: use 1 (collapse the loaded model into 2 MiB pages) or 0")
    return value == "1"


def collapse_resident_memory() -> CollapseReport:
    """Collapse the process's fully resident anonymous memory into 2 MiB pages (see the module docstring).
    Call it after the weights are loaded and repacked, when they are the bulk of that memory."""
    if not sys.platform.startswith("linux"):
        return CollapseReport(reason="not Linux")
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
        libc = _libc()
    except OSError as e:
        return CollapseReport(reason=str(e))
    report, t0 = CollapseReport(), time.perf_counter()
    for start, end in anonymous_regions(maps):
        if end - start < HUGE_PAGE:
            continue
        for a, b in resident_huge_stretches(libc, start, end):
            if libc.madvise(a, b - a, _MADV_COLLAPSE) == 0:
                report.collapsed_bytes += b - a
                continue
            err = ctypes.get_errno()
            report.refused_bytes += b - a
            report.reason = report.reason or os.strerror(err)
            if err == errno.EINVAL:         # no MADV_COLLAPSE in this kernel: nothing else will take
                break
    report.seconds = time.perf_counter() - t0
    log.info("huge pages: %d MiB collapsed, %d MiB refused (%s) in %.2f s", report.collapsed_bytes >> 20,
             report.refused_bytes >> 20, report.reason or "-", report.seconds)
    return report
