"""Conversations -> packed training batches for the SAME model classes inference uses.

Many conversations are packed into one flat token stream (the model's forward takes flat tokens and
3-row positions) and attend only within themselves through `PackedCausalAttention`, an attention backend
that keeps no cache. Loss falls on assistant tokens only: each assistant turn's text and its <|im_end|>.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..inputs import PreprocessorConfig, build_inputs
from ..tokenizer import Tokenizer


@dataclass
class Example:
    token_ids: torch.Tensor       # LongTensor[N]
    positions: torch.Tensor       # LongTensor[3, N]
    loss_mask: torch.Tensor       # BoolTensor[N]: token i is a target (predicted from position i - 1)
    pixel_values: torch.Tensor    # [P, C*T*ps*ps] (P may be 0)
    grid_thw: torch.Tensor        # LongTensor[n_images, 3]


class Encoder:
    """Turns one conversation (user/assistant messages, images inline) into an Example."""

    def __init__(self, tokenizer: Tokenizer, model_cfg: ModelConfig, pre_cfg: PreprocessorConfig):
        self.tokenizer, self.model_cfg, self.pre_cfg = tokenizer, model_cfg, pre_cfg
        self.header = tokenizer.encode("<|im_start|>assistant\n")
        self.im_end = tokenizer.token_to_id("<|im_end|>")

    def __call__(self, messages: list[dict]) -> Example:
        inputs = build_inputs(messages, self.tokenizer, self.model_cfg, self.pre_cfg, add_generation_prompt=False)
        ids = inputs.token_ids
        mask = torch.zeros(len(ids), dtype=torch.bool)
        h = len(self.header)
        i = 0
        while i + h <= len(ids):
            if ids[i:i + h] == self.header:
                j = i + h
                while j < len(ids) and ids[j] != self.im_end:
                    j += 1
                mask[i + h:min(j + 1, len(ids))] = True   # the answer and its <|im_end|>
                i = j
            i += 1
        if not mask.any():
            raise ValueError("conversation has no assistant turn to learn from")
        if inputs.vision:
            pixels = torch.cat([v.pixel_values for v in inputs.vision])
            grid = torch.tensor([v.grid_thw for v in inputs.vision], dtype=torch.long)
        else:
            width = self.pre_cfg.temporal_patch_size * self.pre_cfg.patch_size ** 2 * 3
            pixels, grid = torch.zeros(0, width), torch.zeros(0, 3, dtype=torch.long)
        return Example(torch.tensor(ids, dtype=torch.long), inputs.positions, mask, pixels, grid)


@dataclass
class PackedBatch:
    token_ids: torch.Tensor       # [N]
    positions: torch.Tensor       # [3, N]
    loss_mask: torch.Tensor       # [N]
    segment_ids: torch.Tensor     # [N]: which conversation each token belongs to
    pixel_values: torch.Tensor    # [P, ...]
    grid_thw: torch.Tensor        # [n, 3]

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())

    def to(self, device) -> "PackedBatch":
        return PackedBatch(*(t.to(device, non_blocking=True) for t in (
            self.token_ids, self.positions, self.loss_mask, self.segment_ids, self.pixel_values, self.grid_thw)))


def pack(examples: list[Example]) -> PackedBatch:
    return PackedBatch(
        token_ids=torch.cat([e.token_ids for e in examples]),
        positions=torch.cat([e.positions for e in examples], dim=1),
        loss_mask=torch.cat([e.loss_mask for e in examples]),
        segment_ids=torch.cat([torch.full((len(e.token_ids),), i, dtype=torch.long)
                               for i, e in enumerate(examples)]),
        pixel_values=torch.cat([e.pixel_values for e in examples]),
        grid_thw=torch.cat([e.grid_thw for e in examples]),
    )


class PackedCausalAttention:
    """Attention backend for training: causal within each packed conversation, nothing cached."""

    def __init__(self, segment_ids: torch.Tensor):
        n = segment_ids.numel()
        causal = torch.ones(n, n, dtype=torch.bool, device=segment_ids.device).tril()
        self.mask = causal & (segment_ids[:, None] == segment_ids[None, :])        # [N, N]

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        qh = q.transpose(0, 1)                                                      # [Hq, N, Dh]
        kh = k.transpose(0, 1).repeat_interleave(groups, dim=0)
        vh = v.transpose(0, 1).repeat_interleave(groups, dim=0)
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=self.mask).transpose(0, 1)


def packed_loss(model, batch: PackedBatch) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over the batch's target tokens; -> (loss, number of targets)."""
    vision, deepstack = None, []
    if batch.grid_thw.numel():
        dtype = next(model.parameters()).dtype
        vision, deepstack = model.encode_vision(batch.pixel_values.to(dtype), batch.grid_thw)
    hidden = model(batch.token_ids, batch.positions, PackedCausalAttention(batch.segment_ids), vision, deepstack)
    # Token i is predicted from hidden state i - 1 of the same conversation.
    targets = batch.loss_mask.clone()
    targets[0] = False
    same_segment = torch.zeros_like(targets)
    same_segment[1:] = batch.segment_ids[1:] == batch.segment_ids[:-1]
    targets &= same_segment
    idx = targets.nonzero().squeeze(1)
    logits = model.compute_logits(hidden[idx - 1])                                  # [T, V] float32
    return F.cross_entropy(logits, batch.token_ids[idx]), int(idx.numel())
