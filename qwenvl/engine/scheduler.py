"""Which sequences run in the next step, and how many of their tokens.

Plain Python. One step is a list of chunks, one per scheduled sequence, each the token range
[start, end) whose KV the step computes: a slice of a prompt (chunked prefill), the recompute of a
preempted request's prompt + output, or the single newest token of a decoding request. When a chunk
ends at the sequence's last token the step samples the next token for it.

Policy (vLLM v1 shaped, one queue of work measured in tokens):
  * running sequences first (decodes, then unfinished prefills, each in admission order), each
    taking up to the remaining token budget; when the KV pool is short, the most recently admitted
    running sequence not yet scheduled in this step is preempted by recompute (blocks freed, put
    back at the front of the waiting queue with its output kept);
  * then waiting sequences in order while the token budget, max_num_seqs and the pool allow;
  * a chunk that reaches the first pad of an image/video whose features are not cached counts the
    whole span against the per-step encoder budget; a chunk that would exceed it stops just before
    that span (unless nothing else is encoded this step, so a huge image still makes progress);
  * with `encode_ahead`, a chunk instead always stops just before an uncached span and the span is listed
    in the step's `encode`: the runner encodes it over the following steps, a slice of the tower per step,
    while the running requests keep decoding; the chunk goes on once the features are cached;
  * with `max_prefill_tokens_while_decoding`, a step that decodes runs at most that many prefill tokens
    (chunks of prompts and recomputes), so a long prompt arriving costs each running stream one short
    step at a time instead of one long one; steps without decodes keep the whole token budget.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

from qwenvl.engine.block_manager import BlockManager
from qwenvl.engine.sequence import Sequence, SequenceStatus, VisionSpan
from qwenvl.engine.stopping import check_stop_token


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int                    # first token whose KV this step computes
    end: int                      # one past the last
    encode: list[VisionSpan] = field(default_factory=list)   # uncached spans whose first pad is in [start, end)
    # True when this chunk completes the sequence's known tokens: the step samples the next one.
    needs_sample: bool = field(init=False)

    def __post_init__(self):
        self.needs_sample = self.end == self.seq.num_tokens

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    @property
    def is_prefill(self) -> bool:
        return self.start < self.seq.num_prompt_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)      # finished by the scheduler (pool too small)
    # encode_ahead: uncached spans the chunks stopped before, with a sequence that holds each (its
    # vision_items have the pixels), in the order they were met; each content hash once
    encode: list[tuple[VisionSpan, Sequence]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass
class _StepBudget:
    """What is left of one step: tokens, vision tokens to encode, and prefill tokens (None: not capped)."""
    tokens: int
    prefill: int | None
    encoder_tokens: int = 0                 # used so far

    def fit(self, want: int, prefill: bool) -> int:
        """How many of `want` tokens the step can still take (a decode's one token ignores the prefill cap)."""
        n = min(want, self.tokens)
        return min(n, self.prefill) if prefill and self.prefill is not None else n

    def take(self, n: int, encode: list[VisionSpan], prefill: bool) -> None:
        self.tokens -= n
        self.encoder_tokens += sum(s.num_tokens for s in encode)
        if prefill and self.prefill is not None:
            self.prefill -= n


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        max_encoder_tokens_per_step: int | None = None,
        enable_chunked_prefill: bool = True,
        eos_token_ids: Iterable[int] = (),
        is_encoder_cached: Callable[[str], bool] | None = None,
        max_model_len: int | None = None,
        encode_ahead: bool = False,
        max_prefill_tokens_while_decoding: int | None = None,
    ):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if max_prefill_tokens_while_decoding is not None and max_prefill_tokens_while_decoding < 1:
            raise ValueError(f"max_prefill_tokens_while_decoding must be >= 1 (or None), got "
                             f"{max_prefill_tokens_while_decoding}")
        if encode_ahead and not enable_chunked_prefill:
            raise ValueError("encode_ahead needs chunked prefill: a chunk stops before each image until it is encoded")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_encoder_tokens_per_step = max_encoder_tokens_per_step
        self.enable_chunked_prefill = enable_chunked_prefill
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.is_encoder_cached = is_encoder_cached or (lambda h: False)
        self.max_model_len = max_model_len
        self.encode_ahead = encode_ahead
        self.max_prefill_tokens_while_decoding = max_prefill_tokens_while_decoding
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Sequence] = {}
        self.num_preemptions = 0

    # ---------------------------------------------------------------- requests
    def add(self, seq: Sequence) -> None:
        """Queue a request; raises ValueError if its prompt could never fit."""
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        cap_tokens = self.bm.num_blocks * self.bm.block_size
        if seq.num_tokens + 1 > cap_tokens:   # +1: room for at least one generated token
            raise ValueError(
                f"request {seq.request_id!r}: the prompt has {seq.num_tokens} tokens but the KV cache "
                f"holds {cap_tokens} ({self.bm.num_blocks} blocks of {self.bm.block_size}); shorten "
                f"the prompt, lower the image resolution (max_pixels) or give the engine more KV memory")
        if self.max_model_len is not None and seq.num_tokens >= self.max_model_len:
            raise ValueError(
                f"request {seq.request_id!r}: the prompt has {seq.num_tokens} tokens, the model's limit "
                f"is {self.max_model_len}")
        if not self.enable_chunked_prefill and seq.num_tokens > self.max_num_batched_tokens:
            raise ValueError(
                f"request {seq.request_id!r}: the prompt has {seq.num_tokens} tokens, more than "
                f"max_num_batched_tokens={self.max_num_batched_tokens} with chunked prefill off")
        seq.status = SequenceStatus.WAITING
        self.requests[seq.request_id] = seq
        self.waiting.append(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Stop a request now and free its blocks. Returns it, or None if unknown/finished."""
        seq = self.requests.get(request_id)
        if seq is None:
            return None
        self._release(seq, SequenceStatus.ABORTED, "abort")
        return seq

    def token_stop(self, seq: Sequence, token: int) -> str | None:
        """Token-level stops after `token` was appended: eos / stop_token_ids, max_tokens, the context."""
        reason = check_stop_token(token, seq.num_output_tokens, seq.params, self.eos_token_ids)
        if reason is None and self.max_model_len is not None and seq.num_tokens >= self.max_model_len:
            reason = "length"
        return reason

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark a running request finished (e.g. a stop string found by the engine) and free it."""
        if seq.request_id in self.requests:
            self._release(seq, SequenceStatus.FINISHED, reason)

    def _release(self, seq: Sequence, status: SequenceStatus, reason: str) -> None:
        """Take a live request out of the queues and give its blocks back."""
        del self.requests[seq.request_id]
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq)
        seq.status = status
        seq.finish_reason = reason

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -------------------------------------------------------------- schedule
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        # prefill tokens this step may take are capped only when the step decodes
        decoding = any(s.num_uncomputed_tokens == 1 for s in self.running)
        left = _StepBudget(self.max_num_batched_tokens, self.max_prefill_tokens_while_decoding if decoding else None)
        self._encode: dict[str, tuple[VisionSpan, Sequence]] = {}
        self._schedule_running(out, left)
        self._schedule_waiting(out, left)
        out.encode = list(self._encode.values())
        return out

    def _schedule_running(self, out: SchedulerOutput, left: "_StepBudget") -> None:
        """Running sequences: decodes first (one token each, so a long prefill chunk cannot starve them),
        then unfinished prefill chunks, each group in admission order; preempts when the pool is short."""
        order = [s for s in self.running if s.num_uncomputed_tokens == 1]
        order += [s for s in self.running if s.num_uncomputed_tokens > 1]
        scheduled: set[int] = set()
        for seq in order:
            if left.tokens <= 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue            # preempted earlier in this loop
            prefill = seq.num_uncomputed_tokens > 1
            n = left.fit(seq.num_uncomputed_tokens, prefill)
            n, enc = self._fit_encoder(seq, seq.num_computed_tokens, n, left.encoder_tokens)
            if n == 0:
                continue
            ok = True
            while not self.bm.append_slots(seq, n):
                # Preempt the most recently admitted sequence not yet scheduled this step; itself last.
                victim = next((v for v in reversed(self.running) if v is not seq and id(v) not in scheduled), seq)
                if victim is seq:
                    if self._nothing_else_holds(seq):
                        self.running.remove(seq)     # alone and still short: it outgrew the whole pool
                        self._fail(seq, out)
                    else:
                        self._preempt(seq, out)
                    ok = False
                    break
                self._preempt(victim, out)
            if not ok:
                continue
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, seq.num_computed_tokens + n, enc))
            scheduled.add(id(seq))
            left.take(n, enc, prefill)

    def _schedule_waiting(self, out: SchedulerOutput, left: "_StepBudget") -> None:
        """Waiting sequences, in order; no preemption on their behalf. With encode_ahead, one that cannot
        start before its image is encoded lets the ones behind it go first."""
        blocked: list[Sequence] = []
        while self.waiting and left.tokens > 0 and len(self.running) < self.max_num_seqs:
            if out.preempted:
                break               # the pool is short this step; let the running ones finish first
            seq = self.waiting[0]
            start = len(self.bm.match_prefix(seq)) * self.bm.block_size
            n = left.fit(seq.num_tokens - start, True)
            if n <= 0:
                break
            n, enc = self._fit_encoder(seq, start, n, left.encoder_tokens)
            if n == 0 and self.encode_ahead and self._waits_for_encoder(seq, start):
                blocked.append(self.waiting.popleft())
                continue
            if n == 0 or (not self.enable_chunked_prefill and n < seq.num_tokens - start):
                break
            cached = self.bm.admit(seq, n)
            if cached is None:
                break
            assert cached == start
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, start, start + n, enc))
            left.take(n, enc, True)
        self.waiting.extendleft(reversed(blocked))

    def _waits_for_encoder(self, seq: Sequence, start: int) -> bool:
        """Whether token `start` of seq is the first pad of a span whose features are not cached yet."""
        return any(s.token_offset == start and not self.is_encoder_cached(s.content_hash) for s in seq.vision)

    def _fit_encoder(self, seq: Sequence, start: int, n: int, enc_used: int) -> tuple[int, list[VisionSpan]]:
        """Shrink the chunk [start, start+n) to respect the encoder budget; return (n, spans to encode)."""
        spans = [s for s in seq.vision if start <= s.token_offset < start + n]
        enc: list[VisionSpan] = []
        limit = self.max_encoder_tokens_per_step
        for s in spans:
            if self.is_encoder_cached(s.content_hash):
                continue
            if self.encode_ahead:                      # wait for the runner to encode it, a slice per step
                self._encode.setdefault(s.content_hash, (s, seq))
                return s.token_offset - start, enc
            if limit is not None and enc_used > 0 and enc_used + s.num_tokens > limit:
                return s.token_offset - start, enc     # stop just before this span
            enc.append(s)
            enc_used += s.num_tokens
        return n, enc

    def _nothing_else_holds(self, seq: Sequence) -> bool:
        return self.bm.num_used_blocks == len(seq.block_table)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        out.chunks = [c for c in out.chunks if c.seq is not seq]

    def _fail(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.requests.pop(seq.request_id, None)
        self.bm.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "length"
        seq.error = (f"the request's context ({seq.num_tokens} tokens) outgrew the KV cache "
                     f"({self.bm.num_blocks * self.bm.block_size} tokens)")
        out.failed.append(seq)

    # ------------------------------------------------------------ after step
    def postprocess(self, out: SchedulerOutput, sampled: dict[str, int],
                    logprobs: dict[str, dict[int, float]] | None = None, decide=None) -> list[Sequence]:
        """Advance progress after the runner computed `out`, append the sampled tokens (by request
        id, for chunks that needed a sample), decide which requests finish and free them. Returns the
        sequences finished in this step.

        `decide(seq, token) -> reason | None` is the one place a finish is decided; the engine passes its
        own (token-level stops plus stop strings on the detokenised text); without it, token-level only."""
        decide = decide or self.token_stop
        finished: list[Sequence] = list(out.failed)
        for c in out.chunks:
            seq = c.seq
            if seq.is_finished or seq.status is not SequenceStatus.RUNNING:
                continue            # aborted between schedule and postprocess
            seq.num_computed_tokens = c.end
            self.bm.cache_full_blocks(seq)
            if not c.needs_sample:
                continue
            tok = sampled[seq.request_id]
            seq.append_token(tok, (logprobs or {}).get(seq.request_id))
            reason = decide(seq, tok)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished
