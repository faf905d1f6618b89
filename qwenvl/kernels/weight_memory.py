"""Tensors for packed weights on 2 MiB pages from their first touch (Linux transparent huge pages).

Why: a batch-1 decode step streams every weight once, ~400,000 4 KiB pages per token at 2B widths, each a
TLB miss and a page walk (in a VM, a two-level one). qwenvl/checkpoints/huge_pages.py collapses the loaded
model into huge pages afterwards (`QWENVL_HUGE_PAGES=1`), at the cost of copying it; the repacked weights
can instead be born on huge pages, at no cost: the kernels' layouts (int8_layout.pack, int4_layout.pack)
allocate their tensors here.

How: an anonymous private mapping (Python's mmap) 2 MiB larger than asked, so that a 2 MiB-aligned start
lies inside it; `MADV_HUGEPAGE` on the whole 2 MiB pages the tensor covers, before anything is written, so
the first write to each faults in a huge page (THP's usual "madvise" mode honours exactly this). The
tensor's last partial 2 MiB and the alignment slack stay 4 KiB pages, so nothing is made resident that
the tensor does not use. torch.frombuffer keeps the mapping alive as long as any view of the tensor is;
the mapping is unmapped when the last one goes.

Where the platform lacks it (not Linux, no MADV_HUGEPAGE, THP "never", the madvise refused) or the
tensor is smaller than one huge page, `empty` is plain `torch.empty`: the weights are the same, only the
pages differ.
"""

from __future__ import annotations

import mmap
import sys

import torch

HUGE_PAGE = 2 << 20
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode() -> str:
    """'always', 'madvise' or 'never' ('' where the file is missing: no THP in this kernel)."""
    try:
        with open(_THP_ENABLED) as f:
            text = f.read()
    except OSError:
        return ""
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return ""


def available() -> bool:
    """Whether `empty` can put tensors on huge pages here."""
    return sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE") and _thp_mode() in ("always",
                                                                                                   "madvise")


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor, its whole 2 MiB pages huge-page backed where `available()`."""
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if nbytes < HUGE_PAGE or not available():
        return torch.empty(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
    whole = torch.frombuffer(region, dtype=torch.uint8)       # holds `region` alive
    offset = -whole.data_ptr() % HUGE_PAGE
    huge_bytes = nbytes // HUGE_PAGE * HUGE_PAGE
    try:
        region.madvise(mmap.MADV_HUGEPAGE, offset, huge_bytes)
    except OSError:             # refused (e.g. THP turned off meanwhile): 4 KiB pages, the same tensor
        pass
    return whole[offset:offset + nbytes].view(dtype).view(shape)


def side_by_side(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of `tensors` (contiguous, CPU) in one buffer from `empty`, each at a 64-byte aligned offset, in order.

    For many tensors under a huge page each that are read in turn: a MoE layer's experts (1.6 MB each at
    Qwen3-VL-30B-A3B widths) alone stay on 4 KiB pages, and a decode step reads 8 different ones a layer, each a
    run of TLB misses; side by side they share 2 MiB pages (bench: the chosen experts' products 14% faster)."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += (n + 63) // 64 * 64
    buffer = empty((total,), torch.uint8)
    copies = []
    for t, n, at in zip(tensors, sizes, offsets):
        copy = buffer[at:at + n].view(t.dtype).view(t.shape)
        copies.append(copy.copy_(t))
    return copies


def huge_page_bytes(t: torch.Tensor) -> int:
    """Bytes of t's memory that sit on huge pages, from /proc/self/smaps (0 where that cannot be read).
    Counts the whole mapping(s) t's data lies in, so it is meant for tensors made by `empty`."""
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    try:
        with open("/proc/self/smaps") as f:
            text = f.read()
    except OSError:
        return 0
    total, inside = 0, False
    for line in text.splitlines():
        head = line.split(maxsplit=1)[0] if line.strip() else ""
        if "-" in head and ":" not in head:                     # a mapping's first line: "start-end perms ..."
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo < end and start < hi
        elif inside and head == "AnonHugePages:":
            total += int(line.split()[1]) * 1024
    return total
