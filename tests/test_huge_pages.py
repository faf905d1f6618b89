"""qwenvl/huge_pages.py: which memory is collapsed into 2 MiB pages, and that nothing is added to RSS."""

from __future__ import annotations

import sys

import pytest
import torch

from qwenvl.checkpoints import huge_pages
from qwenvl.checkpoints.huge_pages import HUGE_PAGE, anonymous_regions, collapse_resident_memory

MAPS = """\
55d0c0000000-55d0c0021000 r--p 00000000 fe:00 1234   /usr/bin/python3.11
55d0c2000000-55d0d2000000 rw-p 00000000 00:00 0      [heap]
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
7f0010000000-7f0010200000 ---p 00000000 00:00 0
7f0020000000-7f0020400000 rw-s 00000000 00:01 99     /dev/shm/x
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0      [stack]
"""


def test_only_private_writable_anonymous_memory_is_a_candidate():
    assert anonymous_regions(MAPS) == [(0x55d0c2000000, 0x55d0d2000000), (0x7f0000000000, 0x7f0010000000)]


def test_the_switch_is_explicit(monkeypatch):
    monkeypatch.delenv(huge_pages.ENV, raising=False)
    assert not huge_pages.requested()
    monkeypatch.setenv(huge_pages.ENV, "1")
    assert huge_pages.requested()
    monkeypatch.setenv(huge_pages.ENV, "yes")
    with pytest.raises(ValueError, match="QWENVL_HUGE_PAGES='yes'"):
        huge_pages.requested()


def _mapping_of(address: int) -> dict[str, int]:
    """Rss and AnonHugePages (bytes) of the mapping holding `address`, from /proc/self/smaps."""
    found, out = False, {}
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and fields[0].count("-") == 1 and ":" in fields[3]:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if found:
                    break
                found = start <= address < end
            elif found and fields[0] in ("Rss:", "AnonHugePages:"):
                out[fields[0][:-1]] = int(fields[1]) * 1024
    return out


def _resident_bytes(t: torch.Tensor) -> int:
    """Bytes of t's own pages that are resident (mincore over exactly its page range)."""
    import ctypes
    page = 4096
    start = t.data_ptr() // page * page
    n_pages = -(-(t.data_ptr() + t.numel() * t.element_size() - start) // page)
    vec = (ctypes.c_ubyte * n_pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    assert libc.mincore(start, n_pages * page, vec) == 0
    return sum(b & 1 for b in vec) * page


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
def test_a_resident_tensor_is_collapsed_and_a_sparse_one_keeps_its_size():
    n = 20 * HUGE_PAGE                                        # 40 MiB: above glibc's largest mmap threshold,
    dense = torch.ones(n, dtype=torch.uint8)                  # so each tensor is a mapping of its own
    sparse = torch.empty(n, dtype=torch.uint8)                # nothing resident yet
    sparse[: n // 2: 4096] = 1                                # its first half all resident (every page written),
    sparse[n // 2:: 8 * 4096] = 1                             # its second half one page in eight
    before = {"Rss": _resident_bytes(sparse)}       # its own pages only: adjacent mappings may merge into one
    report = collapse_resident_memory()
    if report.collapsed_bytes == 0 and report.refused_bytes > 0:      # the kernel said no, not our search
        pytest.skip(f"this kernel collapses nothing ({report.reason})")
    huge = _mapping_of(dense.data_ptr()).get("AnonHugePages", 0)
    # Seen with ~10 GB in use by other processes: none of ours collapsed, or (a busy CI box) only 3 of its 20
    # pages, while the kernel refused more than that: memory too fragmented for 2 MiB pages, not our search.
    if huge < 8 * HUGE_PAGE and report.refused_bytes >= 8 * HUGE_PAGE:
        pytest.skip(f"the kernel refused {report.refused_bytes >> 20} MiB (fragmented memory), ours among it")
    assert huge >= 8 * HUGE_PAGE
    after = {"Rss": _resident_bytes(sparse)}
    assert after["Rss"] <= before["Rss"] + 4096 * 16           # the sparse half gained no pages
    assert torch.equal(dense, torch.ones(n, dtype=torch.uint8))   # the contents are the same


def test_an_engine_asked_for_huge_pages_answers_as_without(tiny_checkpoint, monkeypatch):
    """QWENVL_HUGE_PAGES=1 collapses the loaded model in place: the same greedy tokens as without."""
    from qwenvl import LLM, SamplingParams
    calls = []
    real = huge_pages.collapse_resident_memory
    monkeypatch.setattr(huge_pages, "collapse_resident_memory", lambda: calls.append(1) or real())
    msgs = [{"role": "user", "content": "count to five"}]
    answers = []
    for value in ("0", "1"):
        monkeypatch.setenv(huge_pages.ENV, value)
        llm = LLM(tiny_checkpoint("qwen2_vl"), quantization="int8", dtype="float32")
        answers.append(llm.chat(msgs, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)).token_ids)
    assert calls == [1]                       # asked for once: only when the variable says 1
    assert answers[0] == answers[1] and len(answers[0]) == 6
