"""One request as the engine sees it: tokens, M-RoPE positions, vision spans, progress, KV blocks.

Plain Python (no torch): the scheduler and block manager are unit-tested without it. The prompt's
3-row positions are kept as whatever the input pipeline gave (a LongTensor[3, N] or three lists) and
only sliced by the runner; decode token i (0-based, counted from the end of the prompt) sits at
`next_position + i` on all three rows.
"""

from __future__ import annotations

import bisect
import enum
import itertools
from dataclasses import dataclass
from typing import Any, Sequence as Seq

from qwenvl.sampling_params import SamplingParams  # noqa: F401  (re-exported for the engine)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(frozen=True)
class VisionSpan:
    """One image/video's pad tokens in the prompt: `num_tokens` pads from `token_offset` on, in
    embedding-row order. Usually contiguous; a Qwen3-VL video interleaves timestamp text between its
    frames, so the span [token_offset, end) may hold other tokens too (`pad_positions` then lists
    where the pads are). Build with VisionSpan(content_hash, token_offset, num_tokens); Sequence
    resolves `end` and `pad_positions` from the token ids."""

    content_hash: str
    token_offset: int
    num_tokens: int
    end: int = -1                                   # one past the last pad; -1: contiguous
    pad_positions: tuple[int, ...] | None = None    # None: contiguous

    def __post_init__(self):
        if self.end < 0:
            object.__setattr__(self, "end", self.token_offset + self.num_tokens)

    def rows_in(self, start: int, end: int) -> tuple[int, int]:
        """Embedding rows [r0, r1) of the pads inside tokens [start, end)."""
        lo, hi = max(start, self.token_offset), min(end, self.end)
        if hi <= lo:
            return (0, 0)
        if self.pad_positions is None:
            return (lo - self.token_offset, hi - self.token_offset)
        return (bisect.bisect_left(self.pad_positions, lo), bisect.bisect_left(self.pad_positions, hi))

    def first_pad_in(self, start: int, end: int) -> int | None:
        """Position of the first pad inside tokens [start, end), or None."""
        r0, r1 = self.rows_in(start, end)
        if r1 <= r0:
            return None
        return self.token_offset + r0 if self.pad_positions is None else self.pad_positions[r0]


def resolve_span(token_ids: list[int], content_hash: str, token_offset: int, num_tokens: int) -> VisionSpan:
    """The span's extent, found by counting pad tokens (the id at token_offset) from token_offset on."""
    n = len(token_ids)
    if not 0 <= token_offset < n or num_tokens < 1:
        raise ValueError(f"vision item {content_hash[:12]}: offset {token_offset}, {num_tokens} tokens, "
                         f"prompt of {n}")
    end = token_offset + num_tokens
    pad = token_ids[token_offset]
    if end <= n and all(token_ids[i] == pad for i in range(token_offset, end)):
        return VisionSpan(content_hash, token_offset, num_tokens)
    positions = [i for i in range(token_offset, n) if token_ids[i] == pad][:num_tokens]
    if len(positions) < num_tokens:
        raise ValueError(f"vision item {content_hash[:12]}: {num_tokens} pad tokens from offset "
                         f"{token_offset} expected, the prompt holds {len(positions)}")
    return VisionSpan(content_hash, token_offset, num_tokens, positions[-1] + 1, tuple(positions))


_counter = itertools.count()


class Sequence:
    """A request's token stream and its progress through the engine."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Seq[int],
        params: SamplingParams | None = None,
        positions: Any = None,
        next_position: int | None = None,
        vision: Seq[Any] = (),
    ):
        if len(prompt_token_ids) == 0:
            raise ValueError(f"request {request_id!r}: the prompt is empty")
        self.request_id = request_id
        self.seq_no = next(_counter)                  # arrival order, for stable tie-breaks
        self.params = params if params is not None else SamplingParams()
        self.token_ids: list[int] = [int(t) for t in prompt_token_ids]   # prompt + output
        self.num_prompt_tokens = len(self.token_ids)
        # positions: LongTensor[3, N] or 3 lists of N; None means plain text (0..N-1 on every row).
        self.prompt_positions = positions
        if next_position is None:
            next_position = self.num_prompt_tokens if positions is None else _max_position(positions) + 1
        self.next_position = int(next_position)
        # Any object with content_hash / token_offset / num_tokens (the input pipeline's VisionItem).
        self.vision: list[VisionSpan] = sorted(
            (resolve_span(self.token_ids, v.content_hash, int(v.token_offset), int(v.num_tokens)) for v in vision),
            key=lambda s: s.token_offset,
        )
        # The original items by content hash: the runner reads pixel_values / grid_thw from them
        # when their features are not in the encoder cache.
        self.vision_items: dict[str, Any] = {v.content_hash: v for v in vision}
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0      # tokens whose KV is in this sequence's blocks
        self.num_cached_tokens = 0        # of those, how many came from the prefix cache (last admit)
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []   # chain hashes of full blocks, filled lazily by the block manager
        self.num_registered_blocks = 0        # leading blocks the block manager has offered to the prefix cache
        self.finish_reason: str | None = None
        self.output_logprobs: list[dict[int, float] | None] = []
        self.num_preemptions = 0
        self.error: str | None = None

    # ------------------------------------------------------------------ tokens
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status in (SequenceStatus.FINISHED, SequenceStatus.ABORTED)

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    def append_token(self, token_id: int, logprobs: dict[int, float] | None = None) -> None:
        self.token_ids.append(int(token_id))
        self.output_logprobs.append(logprobs)

    # --------------------------------------------------------------- positions
    def position_of(self, i: int) -> tuple[int, int, int]:
        """(t, h, w) M-RoPE position of token i (prompt or output)."""
        if i >= self.num_prompt_tokens:
            p = self.next_position + (i - self.num_prompt_tokens)
            return (p, p, p)
        if self.prompt_positions is None:
            return (i, i, i)
        rows = self.prompt_positions
        return (int(rows[0][i]), int(rows[1][i]), int(rows[2][i]))

    def positions_for(self, start: int, end: int) -> list[list[int]]:
        """Three lists of positions for tokens [start, end) (plain Python; the runner may slice the
        tensor itself for speed)."""
        p = self.num_prompt_tokens
        rows: list[list[int]] = [[], [], []]
        if start < p:
            stop = min(end, p)
            if self.prompt_positions is None:
                for r in rows:
                    r.extend(range(start, stop))
            else:
                for r, src in zip(rows, self.prompt_positions):
                    part = src[start:stop]
                    r.extend(int(x) for x in (part.tolist() if hasattr(part, "tolist") else part))
        if end > p:
            first = self.next_position + max(start - p, 0)
            last = self.next_position + (end - p)
            for r in rows:
                r.extend(range(first, last))
        return rows

    # ------------------------------------------------------------------ vision
    def vision_spans_in(self, start: int, end: int) -> list[VisionSpan]:
        """Vision spans with at least one pad token inside tokens [start, end)."""
        return [s for s in self.vision if s.token_offset < end and s.end > start
                and s.first_pad_in(start, end) is not None]

    def vision_rows_in(self, start: int, end: int) -> list[tuple[VisionSpan, int, int]]:
        """For the pads inside tokens [start, end), in token order: (span, first row, end row) of the
        span's embeddings they take."""
        out = []
        for s in self.vision_spans_in(start, end):
            r0, r1 = s.rows_in(start, end)
            out.append((s, r0, r1))
        return out

    def vision_keys_in(self, start: int, end: int) -> tuple:
        """What identifies the vision content of tokens [start, end) beyond their ids: for each span
        with pads in the range, (content_hash, embedding row of its first pad here, number of its pads
        here, where the first sits in the range). With the token ids (which show where the pads
        are) this is the same as naming (content_hash, offset into the image) for every pad token."""
        keys = []
        for s, r0, r1 in self.vision_rows_in(start, end):
            keys.append((s.content_hash, r0, r1 - r0, s.first_pad_in(start, end) - start))
        return tuple(keys)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, status={self.status.value}, tokens={self.num_tokens}, "
                f"prompt={self.num_prompt_tokens}, computed={self.num_computed_tokens}, "
                f"blocks={len(self.block_table)})")


def _max_position(positions: Any) -> int:
    if hasattr(positions, "max"):
        try:
            return int(positions.max())
        except TypeError:
            pass
    return max(int(x) for row in positions for x in row)
