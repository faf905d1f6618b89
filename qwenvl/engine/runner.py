"""One engine step on the model: vision encoding, the packed LM forward over the paged cache, sampling.

Input: the scheduler's chunks. For each chunk the runner
  * makes sure every image/video with pads in the chunk has features in the encoder cache (all the
    missing ones are encoded in one `encode_vision` call, keyed by content hash);
  * packs the chunk's token ids, its slice of the M-RoPE positions[3, n] (decode tokens sit at
    next_position + i on all rows) and the embedding rows of the pads it holds;
then runs `model.forward` once for the whole batch with a PagedAttention backend, computes logits
only at the last token of each chunk that completes its sequence, and samples those rows.

Encoding ahead (the scheduler's `encode_ahead`, on when `vision_rows_per_step` is set): the images the
scheduler's chunks stopped before are queued, and each step runs a slice of the vision tower before the
language model: whole blocks, until the slice has run `vision_rows_per_step` patch rows x blocks (at least one
block; the whole rest when the step decodes nothing, as then nobody waits). So a 1280x720 image no longer
stalls every running stream for the whole tower; its features are cached when its last block is done and its
request's chunk goes on the step after. One image per tower call: on a CPU a call over several images is no
faster (bench/vision_batching.py: 4 images of 448x448 at 2B widths, one call 1.07-1.09x the time of four),
and an image's float32 features then never depend on which others were encoded with it.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generator

import torch

from qwenvl import kernels
from qwenvl.engine.encoder_cache import EncoderCache
from qwenvl.engine.sampler import Sampler
from qwenvl.engine.sequence import Sequence
from qwenvl.layers.paged_attention import PagedAttention, PagedKVPool


@dataclass
class _VisionJob:
    """One image or video being encoded a slice per step."""
    content_hash: str
    item: object                                  # the VisionItem: pixel_values, grid_thw, num_tokens
    stages: Generator | None = None               # model.encode_vision_stages(...), started on its first slice


class ModelRunner:
    def __init__(self, model, pool: PagedKVPool, sampler: Sampler | None = None,
                 encoder_cache: EncoderCache | None = None, attn_impl: str = "fast",
                 vision_rows_per_step: int | None = None):
        """`vision_rows_per_step`: the slice of vision tower a step that decodes may run, in patch rows x
        blocks (None: every image is encoded whole in the step that first needs it)."""
        if vision_rows_per_step is not None and vision_rows_per_step < 1:
            raise ValueError(f"vision_rows_per_step must be >= 1 (or None), got {vision_rows_per_step}")
        self.vision_rows_per_step = vision_rows_per_step
        self._jobs: OrderedDict[str, _VisionJob] = OrderedDict()    # queued and running, oldest first
        # Features finished ahead, kept until a chunk takes the image's last pad, so an encoder cache too
        # small to hold them cannot make the request wait for ever. Dropped unused after _READY_STEPS steps
        # (an aborted request's image).
        self._ready: dict[str, tuple[tuple, int]] = {}
        self._steps = 0
        self.model = model
        self.pool = pool
        self.sampler = sampler or Sampler()
        self.encoder_cache = encoder_cache if encoder_cache is not None else EncoderCache()
        self.attn_impl = attn_impl
        self.device = pool.device
        self.num_encoded_items = 0          # cumulative images/videos run through the vision tower

    # ------------------------------------------------------------------ vision
    def has_features(self, content_hash: str) -> bool:
        """Whether a chunk with this image's pads can run now (the scheduler's is_encoder_cached)."""
        return content_hash in self._ready or content_hash in self.encoder_cache

    def _queue(self, encode) -> None:
        for span, seq in encode:
            h = span.content_hash
            if h not in self._jobs and not self.has_features(h):
                self.encoder_cache.misses += 1        # as a lookup in the step that needs it would count
                self._jobs[h] = _VisionJob(h, seq.vision_items[h])

    def _advance_vision(self, decoding: bool) -> None:
        """Run queued tower work: a slice of `vision_rows_per_step` when the step decodes, else all of it."""
        budget = self.vision_rows_per_step if decoding else None
        used = 0
        while self._jobs and (budget is None or used < budget):
            job = next(iter(self._jobs.values()))
            if job.stages is None:
                it = job.item
                stages = getattr(self.model, "encode_vision_stages", None)
                pixels = it.pixel_values.to(self.device)
                grid = torch.tensor([list(it.grid_thw)], dtype=torch.long, device=self.device)
                job.stages = stages(pixels, grid) if stages else _whole(self.model.encode_vision(pixels, grid))
            try:
                used += next(job.stages)
            except StopIteration as done:
                embeds, deepstack = done.value
                if embeds.shape[0] != int(job.item.num_tokens):
                    raise RuntimeError(f"encode_vision returned {embeds.shape[0]} rows for "
                                       f"{job.item.num_tokens} vision tokens")
                entry = (embeds, list(deepstack))
                self.encoder_cache.put(job.content_hash, *entry)
                self._ready[job.content_hash] = (entry, self._steps)
                self.num_encoded_items += 1
                del self._jobs[job.content_hash]
        for h in [h for h, (_, step) in self._ready.items() if self._steps - step > _READY_STEPS]:
            del self._ready[h]

    def _features(self, chunks) -> dict[str, tuple]:
        """content_hash -> (embeds, deepstack) for every span with pads in this step's chunks."""
        feats: dict[str, tuple] = {}
        missing: dict[str, object] = {}
        for c in chunks:
            if c.start >= c.seq.num_prompt_tokens:   # output tokens only (every decode): no vision pads
                continue
            for span in c.seq.vision_spans_in(c.start, c.end):
                h = span.content_hash
                if h in feats or h in missing:
                    self.encoder_cache.hits += 1      # another request in this step shows the same image
                    continue
                if h in self._ready:                  # encoded ahead; the last chunk with its pads lets go
                    feats[h] = self._ready[h][0]
                    if c.end >= span.end:
                        del self._ready[h]
                    continue
                hit = self.encoder_cache.get(h)
                if hit is not None:
                    feats[h] = hit
                else:
                    missing[h] = c.seq.vision_items[h]
        if missing:
            items = list(missing.values())
            pixels = torch.cat([it.pixel_values for it in items]).to(self.device)
            grid = torch.tensor([list(it.grid_thw) for it in items], dtype=torch.long, device=self.device)
            embeds, deepstack = self.model.encode_vision(pixels, grid)
            sizes = [int(it.num_tokens) for it in items]
            if embeds.shape[0] != sum(sizes):
                raise RuntimeError(f"encode_vision returned {embeds.shape[0]} rows for {sum(sizes)} vision tokens")
            parts = embeds.split(sizes)
            ds_parts = [d.split(sizes) for d in deepstack]
            for j, (h, it) in enumerate(missing.items()):
                entry = (parts[j], [d[j] for d in ds_parts])
                self.encoder_cache.put(h, *entry)
                feats[h] = entry
            self.num_encoded_items += len(items)
        return feats

    # ------------------------------------------------------------------ inputs
    def _positions(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """LongTensor[3, end - start] (CPU)."""
        p = seq.num_prompt_tokens
        parts = []
        if start < p:
            src = seq.prompt_positions
            stop = min(end, p)
            if isinstance(src, torch.Tensor):
                parts.append(src[:, start:stop].to("cpu", torch.long))
            else:
                parts.append(torch.tensor(seq.positions_for(start, stop), dtype=torch.long).view(3, -1))
        if end > p:
            first = seq.next_position + max(start - p, 0)
            last = seq.next_position + (end - p)
            parts.append(torch.arange(first, last, dtype=torch.long).expand(3, -1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    # -------------------------------------------------------------------- step
    @torch.inference_mode()
    def step(self, chunks, encode=()) -> tuple[dict[str, int], dict[str, dict[int, float]]]:
        """Run the scheduled chunks; returns ({request_id: sampled token}, {request_id: logprobs})
        for the chunks that complete their sequence. `encode`: the scheduler's (span, sequence) pairs of
        images to encode ahead (queued here, run a slice per step)."""
        with kernels.settings_read_once():          # the kernels' environment, read once per step
            return self._step(chunks, encode)

    def _step(self, chunks, encode) -> tuple[dict[str, int], dict[str, dict[int, float]]]:
        self._steps += 1
        self._queue(encode)
        if self._jobs:
            self._advance_vision(decoding=any(c.num_tokens == 1 and not c.is_prefill for c in chunks))
        if not chunks:
            return {}, {}
        feats = self._features(chunks)
        ids: list[int] = []
        pos: list[torch.Tensor] = []
        rows: list[torch.Tensor] = []
        ds_rows: list[list[torch.Tensor]] = []
        # Output tokens sit at next_position + i on all three rows and are never vision pads (spans lie in the
        # prompt): a run of such chunks (every decode) takes one tensor for its positions, not one per sequence.
        outputs: list[int] = []
        for c in chunks:
            seq = c.seq
            ids.extend(seq.token_ids[c.start:c.end])
            p = seq.num_prompt_tokens
            if c.start >= p:
                outputs.extend(range(seq.next_position + c.start - p, seq.next_position + c.end - p))
                continue
            if outputs:
                pos.append(torch.tensor(outputs, dtype=torch.long).expand(3, -1))
                outputs = []
            pos.append(self._positions(seq, c.start, c.end))
            for span, r0, r1 in seq.vision_rows_in(c.start, c.end):
                emb, ds = feats[span.content_hash]
                rows.append(emb[r0:r1])
                ds_rows.append([d[r0:r1] for d in ds])
        if outputs:
            pos.append(torch.tensor(outputs, dtype=torch.long).expand(3, -1))
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)             # [N]
        positions = torch.cat(pos, dim=1).to(self.device)                                # [3, N]
        vision_embeds = torch.cat(rows) if rows else None                                # [K, D]
        deepstack = [torch.cat(level) for level in zip(*ds_rows)] if ds_rows else []     # [K, D] each
        attn = PagedAttention(self.pool, [c.seq.block_table for c in chunks], [c.end for c in chunks],
                              [c.end - c.start for c in chunks], impl=self.attn_impl)
        ends, reqs = [], []
        offset = 0
        for c in chunks:
            offset += c.end - c.start
            if c.needs_sample:
                ends.append(offset - 1)
                reqs.append(c.seq)
        with _matrix_vector_kernels(self.device.type == "cpu" and len(ids) == 1):
            hidden = self.model.forward(input_ids, positions, attn, vision_embeds, deepstack)   # [N, D]
            if not reqs:
                return {}, {}
            logits = self.model.compute_logits(hidden[torch.tensor(ends, device=hidden.device)])   # [B, V]
        out = self.sampler(logits, reqs)
        sampled = {r.request_id: t for r, t in zip(reqs, out.token_ids)}
        logprobs = {r.request_id: lp for r, lp in zip(reqs, out.logprobs) if lp is not None}
        return sampled, logprobs


_READY_STEPS = 64


def _whole(result) -> Generator:
    """A model without encode_vision_stages (tensor-parallel rank 0, test doubles): the whole tower at once."""
    yield 0
    return result


@contextmanager
def _matrix_vector_kernels(on: bool):
    """A one-token step (batch-1 decode) on a CPU: turn oneDNN off so that every Linear is PyTorch's own
    bfloat16 matrix-vector kernel, which streams the weights about 1.5-2x faster than oneDNN's GEMM does
    at one row (measured on AVX512-BF16 Zen 4; from two rows on oneDNN is faster). Same math, fp32 sums."""
    if not on or not torch._C._get_mkldnn_enabled():
        yield
        return
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(True)
