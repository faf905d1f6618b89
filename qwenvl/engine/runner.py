"""One engine step on the model: vision encoding, the packed LM forward over the paged cache, sampling.

Input: the scheduler's chunks. For each chunk the runner
  * makes sure every image/video with pads in the chunk has features in the encoder cache (all the
    missing ones are encoded in one `encode_vision` call, keyed by content hash);
  * packs the chunk's token ids, its slice of the M-RoPE positions[3, n] (decode tokens sit at
    next_position + i on all rows) and the embedding rows of the pads it holds;
then runs `model.forward` once for the whole batch with a PagedAttention backend, computes logits
only at the last token of each chunk that completes its sequence, and samples those rows.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from qwenvl.engine.encoder_cache import EncoderCache
from qwenvl.engine.sampler import Sampler
from qwenvl.engine.sequence import Sequence
from qwenvl.layers.paged_attention import PagedAttention, PagedKVPool


class ModelRunner:
    def __init__(self, model, pool: PagedKVPool, sampler: Sampler | None = None,
                 encoder_cache: EncoderCache | None = None, attn_impl: str = "fast"):
        self.model = model
        self.pool = pool
        self.sampler = sampler or Sampler()
        self.encoder_cache = encoder_cache if encoder_cache is not None else EncoderCache()
        self.attn_impl = attn_impl
        self.device = pool.device
        self.num_encoded_items = 0          # cumulative images/videos run through the vision tower

    # ------------------------------------------------------------------ vision
    def _features(self, chunks) -> dict[str, tuple]:
        """content_hash -> (embeds, deepstack) for every span with pads in this step's chunks."""
        feats: dict[str, tuple] = {}
        missing: dict[str, object] = {}
        for c in chunks:
            for span in c.seq.vision_spans_in(c.start, c.end):
                h = span.content_hash
                if h in feats or h in missing:
                    self.encoder_cache.hits += 1      # another request in this step shows the same image
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
    def step(self, chunks) -> tuple[dict[str, int], dict[str, dict[int, float]]]:
        """Run the scheduled chunks; returns ({request_id: sampled token}, {request_id: logprobs})
        for the chunks that complete their sequence."""
        if not chunks:
            return {}, {}
        feats = self._features(chunks)
        ids: list[int] = []
        pos: list[torch.Tensor] = []
        rows: list[torch.Tensor] = []
        ds_rows: list[list[torch.Tensor]] = []
        for c in chunks:
            seq = c.seq
            ids.extend(seq.token_ids[c.start:c.end])
            pos.append(self._positions(seq, c.start, c.end))
            for span, r0, r1 in seq.vision_rows_in(c.start, c.end):
                emb, ds = feats[span.content_hash]
                rows.append(emb[r0:r1])
                ds_rows.append([d[r0:r1] for d in ds])
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
