"""qwenvl/kernels/weight_memory.py: packed weights allocated on 2 MiB pages from their first touch."""

import mmap
import sys

import pytest
import torch

from qwenvl.kernels import int4_layout, int8_layout, weight_memory
from qwenvl.kernels.weight_memory import HUGE_PAGE

huge_pages_here = pytest.mark.skipif(not weight_memory.available(),
                                     reason="no transparent huge pages in 'always' or 'madvise' mode here")


def test_empty_gives_a_writable_contiguous_tensor_of_the_asked_shape_and_dtype():
    for shape, dtype in [((3 * HUGE_PAGE // 4 + 5,), torch.float32), ((1000, 3001), torch.int8),
                         ((7, 5), torch.bfloat16), ((2, HUGE_PAGE // 2, 3), torch.uint8)]:
        t = weight_memory.empty(shape, dtype)
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
        t.copy_(torch.arange(t.numel()).view(shape).to(dtype))
        assert torch.equal(t, torch.arange(t.numel()).view(shape).to(dtype))


@huge_pages_here
def test_a_large_tensor_starts_2mib_aligned_and_its_whole_huge_pages_are_huge():
    nbytes = 5 * HUGE_PAGE + 12345
    t = weight_memory.empty((nbytes,), torch.int8)
    assert t.data_ptr() % HUGE_PAGE == 0
    t.fill_(1)                                  # the first touch: faults the pages in
    huge = weight_memory.huge_page_bytes(t)
    if huge == 0:
        pytest.skip("the kernel gave no huge page (fragmented memory or THP defrag off): nothing to check")
    # the 5 whole 2 MiB pages the tensor covers, never the partial last one (no resident bytes it does not use)
    assert huge == 5 * HUGE_PAGE
    assert int(t.sum()) == nbytes


@huge_pages_here
def test_the_mapping_lives_as_long_as_a_view_of_it():
    t = weight_memory.empty((4, HUGE_PAGE), torch.int8)
    t.fill_(3)
    row = t[2]
    del t
    assert int(row.sum()) == 3 * HUGE_PAGE      # still mapped: the view holds the buffer


def test_small_tensors_and_platforms_without_it_fall_back_to_torch_empty(monkeypatch):
    def no_mapping(*args, **kwargs):
        raise AssertionError("mapped memory for a tensor that should come from torch.empty")
    monkeypatch.setattr(weight_memory.mmap, "mmap", no_mapping)
    small = weight_memory.empty((HUGE_PAGE // 2 - 1, 2), torch.int8)      # one byte short of a huge page
    assert small.shape == (HUGE_PAGE // 2 - 1, 2)
    monkeypatch.setattr(weight_memory, "available", lambda: False)
    t = weight_memory.empty((HUGE_PAGE,), torch.int8)
    t.fill_(2)
    assert int(t.sum()) == 2 * HUGE_PAGE


def test_madvise_refused_keeps_the_tensor(monkeypatch):
    if not (sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")):
        pytest.skip("no mmap.madvise here")

    class Refusing(mmap.mmap):
        def madvise(self, *args):
            raise OSError(22, "refused")
    monkeypatch.setattr(weight_memory, "available", lambda: True)
    monkeypatch.setattr(weight_memory.mmap, "mmap", Refusing)
    t = weight_memory.empty((3, HUGE_PAGE), torch.int8)
    t.fill_(1)
    assert int(t.sum()) == 3 * HUGE_PAGE


@huge_pages_here
def test_the_layouts_pack_onto_huge_pages_with_the_same_bytes():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (1030, 3000), generator=g, dtype=torch.int8)      # 3 MB of tiles, odd shape
    tiles = int8_layout.pack(q)
    assert tiles.data_ptr() % HUGE_PAGE == 0
    assert torch.equal(int8_layout.unpack(tiles, 1030, 3000), q)
    q4 = torch.randint(0, 16, (2048, 2304), generator=g, dtype=torch.uint8)          # 2.25 MB packed
    scales, mins = torch.rand(2048, 18, generator=g), torch.rand(2048, 18, generator=g)
    packed, params = int4_layout.pack(q4, scales, mins, 128, torch.float32)
    assert packed.data_ptr() % HUGE_PAGE == 0
    assert torch.equal(int4_layout.unpack(packed, 2304), q4)
    s, m = int4_layout.unpack_params(params)
    assert torch.equal(s[:2048], scales) and torch.equal(m[:2048], mins)
    if weight_memory.huge_page_bytes(tiles) == 0:
        pytest.skip("the kernel gave no huge page (fragmented memory): the bytes were checked")
    assert weight_memory.huge_page_bytes(tiles) >= HUGE_PAGE


@huge_pages_here
def test_load_time_int4_layers_and_their_fused_stack_stay_on_huge_pages():
    """Int4Linear.from_weight packs a matrix in parts and joins them, and fusing stacks layers: both join into a
    weight_memory buffer (2 MiB aligned, huge pages where the kernel gives them), with the bytes of a plain cat."""
    from qwenvl.layers.quantized_linear import Int4Linear
    from qwenvl.layers.side_by_side import stack_linears
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5000, 1024, generator=g, dtype=torch.bfloat16)        # two parts of _CHUNK_ROWS, 2.5 MB packed
    layer = Int4Linear.from_weight(w, 128, None)
    parts = [Int4Linear.from_weight(rows, 128, None) for rows in w.split(4096)]
    assert layer.packed.data_ptr() % HUGE_PAGE == 0 and layer.group_params.data_ptr() % 64 == 0
    assert torch.equal(layer.packed, torch.cat([p.packed for p in parts]))
    assert torch.equal(layer.group_params, torch.cat([p.group_params for p in parts]))
    fused = stack_linears([Int4Linear.from_weight(w[:2048], 128, None), Int4Linear.from_weight(w[2048:4096], 128, None)])
    assert fused.packed.data_ptr() % HUGE_PAGE == 0
    assert torch.equal(fused.packed, layer.packed[:4096])
    if weight_memory.huge_page_bytes(layer.packed) == 0:
        pytest.skip("the kernel gave no huge page (fragmented memory): the bytes were checked")
    assert weight_memory.huge_page_bytes(layer.packed) >= HUGE_PAGE
