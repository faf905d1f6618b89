"""Vision features keyed by image content: a bounded LRU measured in vision tokens (embedding rows).

An entry is (embeds[M, D], deepstack: list[Tensor[M, D]]). The same image in a later turn, in another
request, or in the next prefill chunk of the same request is encoded once while it stays cached.
"""

from __future__ import annotations

from collections import OrderedDict


class EncoderCache:
    def __init__(self, max_tokens: int = 16384):
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        self.max_tokens = max_tokens
        self._entries: OrderedDict[str, tuple] = OrderedDict()
        self._tokens = 0
        self.hits = 0          # cumulative lookups answered from the cache
        self.misses = 0

    def __contains__(self, content_hash: str) -> bool:
        return content_hash in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def num_tokens(self) -> int:
        return self._tokens

    def get(self, content_hash: str):
        """(embeds, deepstack) or None; a hit refreshes the entry's recency."""
        entry = self._entries.get(content_hash)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(content_hash)
        self.hits += 1
        return entry

    def put(self, content_hash: str, embeds, deepstack=()) -> None:
        """Store features, evicting least recently used entries to stay within max_tokens. An entry
        larger than the whole cache is not kept."""
        n = int(embeds.shape[0])
        old = self._entries.pop(content_hash, None)
        if old is not None:
            self._tokens -= int(old[0].shape[0])
        if n > self.max_tokens:
            return
        while self._tokens + n > self.max_tokens and self._entries:
            _, (e, _) = self._entries.popitem(last=False)
            self._tokens -= int(e.shape[0])
        self._entries[content_hash] = (embeds, list(deepstack))
        self._tokens += n

    def clear(self) -> None:
        self._entries.clear()
        self._tokens = 0
