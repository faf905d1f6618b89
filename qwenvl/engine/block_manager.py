"""KV block bookkeeping: fixed-size blocks, reference counts, a free list and a prefix cache.

Plain Python. A block holds `block_size` consecutive tokens of one sequence. Once every token of a
full block has its KV computed, the block is registered in the prefix cache under a chain hash:
blake2b(parent block hash + the block's token ids + the vision keys of its pad tokens). The vision
keys name, for every image/video pad in the block, the image's content hash and the pad's offset
into that image, so two different images of the same size (same pad ids) never share a block while
the same image in a later turn or in another request does.

Blocks whose reference count drops to zero keep their hash and wait in an LRU of evictable blocks;
a later request can revive them, and allocation evicts the least recently freed one when the plain
free list is empty. Only blocks whose KV was fully computed are ever registered, so a prefix hit
never hands out half-written KV.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from qwenvl.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None   # set only while registered in the prefix cache


def block_hash(parent: bytes | None, token_ids, vision_keys: tuple = ()) -> bytes:
    """Chain hash of one full block. Pure function of the prefix, so equal hashes mean equal KV."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\x00" * 16)
    h.update(array("q", token_ids).tobytes())
    for content_hash, offset, count, where in vision_keys:
        h.update(f"|{content_hash}:{offset}:{count}:{where}".encode())
    return h.digest()


class BlockManager:
    """Owns `num_blocks` KV blocks of `block_size` tokens."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))          # ref 0, no hash
        self._evictable: OrderedDict[int, None] = OrderedDict()   # ref 0, hashed; oldest first
        self._cached: dict[bytes, int] = {}                        # hash -> block id
        self.prefix_cache_hit_tokens = 0                           # cumulative
        self.prefix_cache_queried_tokens = 0                       # cumulative

    # ---------------------------------------------------------------- counters
    @property
    def num_free_blocks(self) -> int:
        """Blocks that an allocation can take now (plain free + evictable cached)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by live requests."""
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ hashes
    def _hashes(self, seq: Sequence, num_full_blocks: int) -> list[bytes]:
        """Chain hashes of (at least) the first `num_full_blocks` full blocks, memoised on the sequence."""
        bs = self.block_size
        hashes = seq.block_hashes
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            start, end = i * bs, (i + 1) * bs
            parent = hashes[-1] if hashes else None
            hashes.append(block_hash(parent, seq.token_ids[start:end], seq.vision_keys_in(start, end)))
        return hashes

    # --------------------------------------------------------------- admission
    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached block ids for the longest cached prefix, leaving at least one token to compute
        (its logits give the next token)."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hit: list[int] = []
        for h in self._hashes(seq, max_blocks)[:max_blocks]:
            bid = self._cached.get(h)
            if bid is None:
                break
            hit.append(bid)
        return hit

    def admit(self, seq: Sequence, num_new_tokens: int) -> int | None:
        """First allocation for a sequence with no blocks: reuse its cached prefix, then allocate
        enough blocks for `num_new_tokens` more tokens after the cached ones (capped at what the
        sequence has). Returns the number of cached tokens, or None (nothing changed) if the pool
        cannot hold it now. Sets seq.num_computed_tokens / num_cached_tokens."""
        assert not seq.block_table, f"{seq.request_id} already holds blocks"
        hit = self.match_prefix(seq)
        cached_tokens = len(hit) * self.block_size
        total = min(seq.num_tokens, cached_tokens + max(num_new_tokens, 0))
        need_new = self.blocks_needed(total) - len(hit)
        revived = sum(1 for b in hit if self.blocks[b].ref_count == 0)
        if need_new + revived > self.num_free_blocks:
            return None
        for b in hit:
            self._take(b)
        seq.block_table = list(hit)
        for _ in range(need_new):
            seq.block_table.append(self._allocate_one())
        seq.num_computed_tokens = cached_tokens
        seq.num_cached_tokens = cached_tokens
        self.prefix_cache_hit_tokens += cached_tokens
        self.prefix_cache_queried_tokens += seq.num_tokens
        return cached_tokens

    def can_admit(self, seq: Sequence, num_new_tokens: int) -> bool:
        hit = self.match_prefix(seq)
        total = min(seq.num_tokens, len(hit) * self.block_size + max(num_new_tokens, 0))
        revived = sum(1 for b in hit if self.blocks[b].ref_count == 0)
        return self.blocks_needed(total) - len(hit) + revived <= self.num_free_blocks

    # -------------------------------------------------------------- growth
    def slots_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """New blocks needed so that tokens up to num_computed + num_new_tokens have a slot."""
        return max(0, self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table))

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.slots_needed(seq, num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow the block table so num_computed + num_new_tokens tokens have slots. False (and no
        change) if the pool is short."""
        need = self.slots_needed(seq, num_new_tokens)
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            seq.block_table.append(self._allocate_one())
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register every full block whose tokens are all computed. Call after a step advanced
        seq.num_computed_tokens."""
        if not self.enable_prefix_caching:
            return
        n_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        hashes = self._hashes(seq, n_full)
        for i in range(seq.num_registered_blocks, n_full):   # earlier blocks were handled already
            h = hashes[i]
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None:
                continue            # registered already (ours, or shared from the cache)
            if h in self._cached:
                continue            # an identical block computed by another request is cached; keep ours private
            block.hash = h
            self._cached[h] = block.block_id
        seq.num_registered_blocks = max(seq.num_registered_blocks, n_full)

    # ------------------------------------------------------------------ free
    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references. Hashed blocks become evictable (last block first, so the
        tail of a prefix is evicted before its head)."""
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            assert block.ref_count > 0, f"double free of block {bid}"
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self._evictable[bid] = None
                else:
                    self._free.append(bid)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no live request holds."""
        while self._evictable:
            bid, _ = self._evictable.popitem(last=False)
            self._uncache(bid)
            self._free.append(bid)

    # -------------------------------------------------------------- internals
    def _take(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.ref_count == 0:
            del self._evictable[bid]
        block.ref_count += 1

    def _allocate_one(self) -> int:
        if self._free:
            bid = self._free.popleft()
        else:
            bid, _ = self._evictable.popitem(last=False)   # least recently freed
            self._uncache(bid)
        block = self.blocks[bid]
        assert block.ref_count == 0 and block.hash is None
        block.ref_count = 1
        return bid

    def _uncache(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.hash is not None and self._cached.get(block.hash) == bid:
            del self._cached[block.hash]
        block.hash = None

    def check_invariants(self) -> None:
        """Consistency checks for tests."""
        free, evict = set(self._free), set(self._evictable)
        assert len(free) == len(self._free) and not (free & evict)
        for b in self.blocks:
            if b.block_id in free:
                assert b.ref_count == 0 and b.hash is None
            elif b.block_id in evict:
                assert b.ref_count == 0 and b.hash is not None
            else:
                assert b.ref_count > 0, f"block {b.block_id} is lost"
            if b.hash is not None:
                assert self._cached[b.hash] == b.block_id
        assert len(self._cached) == sum(1 for b in self.blocks if b.hash is not None)
