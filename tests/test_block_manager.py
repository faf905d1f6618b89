"""Block manager: refcounts, free list, image-aware prefix cache, LRU eviction. No torch."""

import pytest

from qwenvl.engine.block_manager import BlockManager
from qwenvl.engine.sequence import Sequence, VisionSpan

PAD = 99


def seq(rid, tokens, vision=()):
    return Sequence(rid, tokens, vision=vision)


def compute(bm, s, n):
    """Pretend the runner computed n more tokens."""
    assert bm.append_slots(s, n)
    s.num_computed_tokens += n
    bm.cache_full_blocks(s)


def test_allocate_free_counts():
    bm = BlockManager(8, 4)
    s = seq("a", list(range(10)))
    assert bm.admit(s, 10) == 0
    assert len(s.block_table) == 3 and bm.num_used_blocks == 3 and bm.num_free_blocks == 5
    s.num_computed_tokens = 10
    bm.cache_full_blocks(s)
    assert bm.num_cached_blocks == 2            # the partial third block is not cached
    s.append_token(50); s.append_token(51)      # tokens 10, 11 fit in block 3
    assert bm.slots_needed(s, 2) == 0
    s.append_token(52)
    assert bm.slots_needed(s, 3) == 1 and bm.append_slots(s, 3) and len(s.block_table) == 4
    bm.free(s)
    assert s.block_table == [] and s.num_computed_tokens == 0
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 8
    bm.check_invariants()


def test_prefix_hit_shared_and_after_free():
    bm = BlockManager(16, 4)
    a = seq("a", list(range(13)))
    bm.admit(a, 13)
    b = seq("b", list(range(13)))
    assert bm.admit(b, 13) == 0                 # a's blocks are not computed yet: no hit
    bm.free(b)
    a.num_computed_tokens = 13
    bm.cache_full_blocks(a)
    c = seq("c", list(range(12)) + [77, 78])
    assert bm.admit(c, 14) == 12                # 3 full blocks shared
    assert c.block_table[:3] == a.block_table[:3] and c.num_computed_tokens == 12
    assert all(bm.blocks[x].ref_count == 2 for x in a.block_table[:3])
    bm.free(a)
    bm.free(c)
    assert bm.num_used_blocks == 0
    d = seq("d", list(range(8)) + [5, 5, 5])    # revives 2 evictable blocks
    assert bm.admit(d, 11) == 8 and bm.num_used_blocks == 3
    assert bm.prefix_cache_hit_tokens == 20
    bm.check_invariants()


def test_full_prompt_hit_leaves_one_token():
    bm = BlockManager(8, 4)
    a = seq("a", list(range(8)))
    bm.admit(a, 8); compute(bm, a, 0); a.num_computed_tokens = 8; bm.cache_full_blocks(a)
    b = seq("b", list(range(8)))
    assert bm.admit(b, 8) == 4                  # the last block is recomputed for the logits
    bm.check_invariants()


def test_images_of_same_size_never_share_same_image_does():
    bm = BlockManager(32, 4)
    toks = [1, 2] + [PAD] * 8 + [3, 4, 5, 6]

    def img(rid, h):
        return seq(rid, toks, vision=[VisionSpan(h, 2, 8)])

    a = img("a", "img-A")
    bm.admit(a, 14); a.num_computed_tokens = 14; bm.cache_full_blocks(a)
    assert bm.admit(img("b", "img-B"), 14) == 0
    c = img("c", "img-A")
    assert bm.admit(c, 14) == 12
    # Same image but at a different offset into the image within the block: no hit either.
    shifted = seq("d", [1] + [PAD] * 8 + [3, 4, 5, 6, 7], vision=[VisionSpan("img-A", 1, 8)])
    assert bm.admit(shifted, 14) == 0
    bm.check_invariants()


def test_multi_turn_reuses_output_blocks():
    bm = BlockManager(16, 4)
    a = seq("a", [1, 2, 3, 4, 5, 6])
    bm.admit(a, 6); a.num_computed_tokens = 6
    for t in [7, 8, 9]:                          # decode: token appended, computed next step
        a.append_token(t)
        compute(bm, a, 1)
    assert a.num_computed_tokens == 9
    bm.free(a)
    turn2 = seq("b", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    assert bm.admit(turn2, 11) == 8


def test_lru_eviction_and_no_room():
    bm = BlockManager(4, 2)
    a = seq("a", [1, 2, 3, 4, 5])
    bm.admit(a, 5); a.num_computed_tokens = 5; bm.cache_full_blocks(a)
    bm.free(a)                                   # 2 cached evictable + 2 free
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 4
    b = seq("b", [9, 9, 9, 9, 9, 9])
    assert bm.admit(b, 6) == 0                   # needs 3: takes 2 free, evicts the tail block of a
    assert bm.num_cached_blocks == 1
    a2 = seq("a2", [1, 2, 3, 4, 5])
    assert bm.can_admit(a2, 5) is False          # 1 cached hit revived + 2 new > 1 free
    assert bm.admit(a2, 5) is None and a2.block_table == []
    bm.free(b)
    assert bm.admit(a2, 5) == 2                  # the head block survived
    bm.check_invariants()


def test_identical_concurrent_blocks_keep_one_cached():
    bm = BlockManager(8, 2)
    a, b = seq("a", [1, 2, 3]), seq("b", [1, 2, 3])
    bm.admit(a, 3); bm.admit(b, 3)
    for s in (a, b):
        s.num_computed_tokens = 3
        bm.cache_full_blocks(s)
    assert bm.num_cached_blocks == 1
    bm.free(a); bm.free(b)
    bm.check_invariants()
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == 8


def test_prefix_caching_off():
    bm = BlockManager(8, 2, enable_prefix_caching=False)
    a = seq("a", [1, 2, 3])
    bm.admit(a, 3); a.num_computed_tokens = 3; bm.cache_full_blocks(a)
    assert bm.admit(seq("b", [1, 2, 3]), 3) == 0 and bm.num_cached_blocks == 0


def test_bad_sizes():
    with pytest.raises(ValueError):
        BlockManager(0, 16)


def test_sequence_spans_positions_and_interleaved_video():
    # Qwen3-VL style video: <t> start pads end <t> start pads end; pads are 99, 3 per frame
    toks = [1, 50, 7, 99, 99, 99, 8, 51, 7, 99, 99, 99, 8, 2]
    s = Sequence("v", toks, vision=[VisionSpan("vid", 3, 6)])
    sp = s.vision[0]
    assert sp.end == 12 and sp.pad_positions == (3, 4, 5, 9, 10, 11)
    assert s.vision_rows_in(0, 8) == [(sp, 0, 3)] and s.vision_rows_in(6, 9) == []
    assert s.vision_rows_in(4, 11) == [(sp, 1, 5)]
    assert s.vision_keys_in(8, 12) == (("vid", 3, 3, 1),)
    with pytest.raises(ValueError, match="pad tokens"):
        Sequence("bad", toks, vision=[VisionSpan("vid", 3, 7)])
    # positions: plain text defaults, then decode continues from next_position
    t = Sequence("t", [5, 6, 7], positions=[[0, 1, 1], [0, 1, 2], [0, 1, 3]])
    assert t.next_position == 4
    t.append_token(9); t.append_token(10)
    assert t.positions_for(1, 5) == [[1, 1, 4, 5], [1, 2, 4, 5], [1, 3, 4, 5]]
    assert t.position_of(4) == (5, 5, 5) and t.position_of(2) == (1, 2, 3)
    assert Sequence("p", [1, 2]).positions_for(0, 2) == [[0, 1]] * 3
    with pytest.raises(ValueError, match="empty"):
        Sequence("e", [])
