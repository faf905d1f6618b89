"""Conversations -> packed training batches for the SAME model classes inference uses.

Many conversations are packed into one flat token stream (the model's forward takes flat tokens and
3-row positions) and attend only within themselves, through an attention backend that keeps no cache.
Loss falls on assistant tokens only: each assistant turn's text and its <|im_end|>.

The data path is compact: a data worker sends each image as uint8 patches in merge-block order, ONE frame
per temporal patch when the image is a still (the processor repeats a still over `temporal_patch_size`
frames), about 1/8 of the bytes of float32 pixel_values. `PixelUnpacker` turns them into exactly the
float32 pixel_values of `qwenvl.inputs` (a 256-entry table per channel, computed with the same float
steps) on the training device. `Encoder(compact=False)` is the reference path through `build_inputs`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..models.config import ModelConfig
from ..inputs import InputError, PreprocessorConfig, build_inputs, load_image, normalize_messages, smart_resize
from ..inputs.mrope import VisionSpan, mrope_positions
from ..tokenizer import Tokenizer
from .patch_labels import LM_PROBE_LAYER, token_places


@dataclass
class Example:
    token_ids: torch.Tensor       # LongTensor[N]
    positions: torch.Tensor       # LongTensor[3, N]
    loss_mask: torch.Tensor       # BoolTensor[N]: token i is a target (predicted from position i - 1)
    pixel_values: torch.Tensor    # compact: uint8 [P, C, F, ps, ps] (F = 1 for stills, else T);
                                  # reference: float32 [P, C*T*ps*ps]; P may be 0
    grid_thw: torch.Tensor        # LongTensor[n_images, 3]
    vision_labels: torch.Tensor | None = None   # LongTensor[M, LABEL_COLUMNS] per merged image token (patch_labels.py)


class PixelUnpacker:
    """uint8 patches [P, C, F, ps, ps] -> float32 pixel_values [P, C*T*ps*ps], equal to `qwenvl.inputs`'.

    The float path there is `(u8 as float64 * rescale) as float32`, then `(x - mean) / std` in float32; a
    pixel's value depends only on its byte and channel, so a [C, 256] table computed with those very steps
    gives the same bits, on any device, for the cost of one gather.
    """

    def __init__(self, cfg: PreprocessorConfig, device: torch.device | str = "cpu"):
        x = (np.arange(256, dtype=np.float64) * cfg.rescale_factor).astype(np.float32)[None, :]   # [1, 256]
        if cfg.do_normalize:
            mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None]
            std = np.asarray(cfg.image_std, dtype=np.float32)[:, None]
            x = (x - mean) / std                                                # [C, 256] float32
        self.table = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
        self.temporal = cfg.temporal_patch_size

    def to(self, device) -> "PixelUnpacker":
        out = object.__new__(PixelUnpacker)
        out.table, out.temporal = self.table.to(device), self.temporal
        return out

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dtype != torch.uint8:
            return pixels                                                       # already float rows
        p, c, f, ps, _ = pixels.shape
        offsets = torch.arange(c, device=pixels.device).view(1, c, 1, 1, 1) * 256
        x = self.table.view(-1)[pixels.long() + offsets]                         # [P, C, F, ps, ps] float32
        if f != self.temporal:                                                  # a still: repeat the frame
            x = x.expand(p, c, self.temporal, ps, ps)
        return x.reshape(p, c * self.temporal * ps * ps)


def patchify_uint8(image: np.ndarray, cfg: PreprocessorConfig) -> np.ndarray:
    """uint8 [H, W, C] (already resized) -> uint8 [gh*gw, C, 1, ps, ps] in merge-block order (one frame)."""
    ps, m = cfg.patch_size, cfg.merge_size
    h, w, c = image.shape
    gh, gw = h // ps, w // ps
    x = image.reshape(gh // m, m, ps, gw // m, m, ps, c)
    # -> (gh/m, gw/m, m, m, C, ps, ps): the rows of one merge block are consecutive, as in qwenvl.inputs.
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)
    return np.ascontiguousarray(x).reshape(gh * gw, c, 1, ps, ps)


class Encoder:
    """Turns one conversation (user/assistant messages, images inline) into an Example.

    compact=True (training): images are resized once and sent as uint8 patches; the token ids and M-RoPE
    positions are built as `build_inputs` builds them for images (a test holds the two paths equal), without
    its float32 pixels and content hash. Conversations with a video take the reference path.
    """

    def __init__(self, tokenizer: Tokenizer, model_cfg: ModelConfig, pre_cfg: PreprocessorConfig,
                 compact: bool = True):
        self.tokenizer, self.model_cfg, self.pre_cfg, self.compact = tokenizer, model_cfg, pre_cfg, compact
        self.header = tokenizer.encode("<|im_start|>assistant\n")
        self.im_end = tokenizer.token_to_id("<|im_end|>")

    def __call__(self, messages: list[dict]) -> Example:
        conv = normalize_messages(messages)
        media = [p for m in conv for p in m["content"] if p["type"] in ("image", "video")]
        if self.compact and all(p["type"] == "image" for p in media):
            ids, positions, pixels, grid = self._compact(conv, media)
        else:
            ids, positions, pixels, grid = self._reference(conv)
        return Example(torch.tensor(ids, dtype=torch.long), positions, self._loss_mask(ids), pixels, grid)

    def _loss_mask(self, ids: list[int]) -> torch.Tensor:
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
        return mask

    def _reference(self, conv: list[dict]):
        inputs = build_inputs(conv, self.tokenizer, self.model_cfg, self.pre_cfg, add_generation_prompt=False)
        if inputs.vision:
            pixels = torch.cat([v.pixel_values for v in inputs.vision])
            grid = torch.tensor([v.grid_thw for v in inputs.vision], dtype=torch.long)
        else:
            width = self.pre_cfg.temporal_patch_size * self.pre_cfg.patch_size ** 2 * 3
            pixels, grid = torch.zeros(0, width), torch.zeros(0, 3, dtype=torch.long)
        return inputs.token_ids, inputs.positions, pixels, grid

    def _compact(self, conv: list[dict], media: list[dict]):
        pre, cfg = self.pre_cfg, self.model_cfg
        ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(conv, add_generation_prompt=False))
        pads = [i for i, t in enumerate(ids) if t in (cfg.image_token_id, cfg.video_token_id)]
        if len(pads) != len(media) or any(ids[i] != cfg.image_token_id for i in pads):
            raise InputError(f"the chat template placed {len(pads)} image slots for {len(media)} images; "
                             "images are only read from user messages, and text must not hold vision pad tokens")
        out: list[int] = []
        spans, patches, grids = [], [], []
        cursor = 0
        for pad, part in zip(pads, media):
            image = load_image(part["image"])
            lo, hi = part.get("min_pixels") or pre.min_pixels, part.get("max_pixels") or pre.max_pixels
            if lo > hi:
                raise InputError(f"min_pixels ({lo}) is larger than max_pixels ({hi})")
            h, w = smart_resize(image.height, image.width, pre.factor, lo, hi)
            if image.size != (w, h):      # PIL bicubic on 8-bit data, as qwenvl.inputs resizes
                image = image.resize((w, h), resample=Image.Resampling.BICUBIC)
            patches.append(patchify_uint8(np.asarray(image, dtype=np.uint8), pre))
            grid = (1, h // pre.patch_size, w // pre.patch_size)
            grids.append(grid)
            out += ids[cursor:pad]
            spans.append(VisionSpan(len(out), grid))
            out += [cfg.image_token_id] * (grid[1] * grid[2] // pre.merge_size ** 2)
            cursor = pad + 1
        out += ids[cursor:]
        positions, _ = mrope_positions(len(out), spans, pre.merge_size)
        ps = pre.patch_size
        pixels = torch.from_numpy(np.concatenate(patches)) if patches else torch.zeros(0, 3, 1, ps, ps, dtype=torch.uint8)
        return out, positions, pixels, torch.tensor(grids, dtype=torch.long).view(-1, 3)


@dataclass
class PackedBatch:
    token_ids: torch.Tensor       # [N]
    positions: torch.Tensor       # [3, N]
    loss_mask: torch.Tensor       # [N]
    segment_ids: torch.Tensor     # [N]: which conversation each token belongs to (0, 1, ... in order)
    pixel_values: torch.Tensor    # uint8 [P, C, F, ps, ps] or float32 [P, C*T*ps*ps] (see Example)
    grid_thw: torch.Tensor        # [n, 3]
    vision_labels: torch.Tensor   # [M, LABEL_COLUMNS] per merged image token, or empty when the examples carry none

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))

    def to(self, device) -> "PackedBatch":
        return PackedBatch(*(getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)))

    def pin_memory(self) -> "PackedBatch":
        """Called by the DataLoader's pin-memory thread (pin_memory=True), so copies to the GPU are async."""
        return PackedBatch(*(getattr(self, f.name).pin_memory() for f in fields(self)))


def pack(examples: list[Example], unpack: PixelUnpacker | None = None) -> PackedBatch:
    """Concatenate examples. Compact pixels stay compact when every example's are; a batch that mixes them
    with float rows (a video in JSONL data) is unpacked here with `unpack`, or a table made on the spot."""
    pixels = [e.pixel_values for e in examples]
    if len({(p.dtype, p.shape[1:]) for p in pixels}) > 1:
        if unpack is None:
            raise ValueError("mixed compact and float pixel_values; pass pack(..., unpack=PixelUnpacker(cfg))")
        pixels = [unpack(p) for p in pixels]
    labelled = [e.vision_labels is not None for e in examples]
    if any(labelled) and not all(labelled):
        raise ValueError("some examples carry vision_labels and some do not; label all of them or none")
    return PackedBatch(
        token_ids=torch.cat([e.token_ids for e in examples]),
        positions=torch.cat([e.positions for e in examples], dim=1),
        loss_mask=torch.cat([e.loss_mask for e in examples]),
        segment_ids=torch.cat([torch.full((len(e.token_ids),), i, dtype=torch.long)
                               for i, e in enumerate(examples)]),
        pixel_values=torch.cat(pixels),
        grid_thw=torch.cat([e.grid_thw for e in examples]),
        vision_labels=torch.cat([e.vision_labels for e in examples]) if all(labelled)
        else torch.zeros(0, dtype=torch.long),
    )


class DenseCausalAttention:
    """Reference training backend: one [N, N] mask, causal within each packed conversation."""

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


class PackedCausalAttention:
    """Training backend: each conversation is one row of a padded [B, H, L, Dh] batch and SDPA runs with
    is_causal=True and no mask, so CUDA takes its flash kernel and the cost is B*L², not N² (N = B*L mean).

    Padding sits after each conversation's tokens, so a real query never sees a pad key; the pad rows'
    outputs are dropped. Segment ids must be 0, 1, ... in order, each a contiguous run (what pack() makes).
    """

    def __init__(self, segment_ids: torch.Tensor):
        n = segment_ids.numel()
        lengths = torch.bincount(segment_ids)                                       # [B]
        self.batch, self.length = int(lengths.numel()), int(lengths.max())          # one host sync per step
        starts = lengths.cumsum(0) - lengths
        offset = torch.arange(n, device=segment_ids.device) - starts[segment_ids]
        self.slot = segment_ids * self.length + offset                              # [N] row in [B*L]

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        b, length = self.batch, self.length

        def padded(x: torch.Tensor) -> torch.Tensor:                               # [N, H, Dh] -> [B, H, L, Dh]
            out = x.new_zeros(b * length, *x.shape[1:])
            out[self.slot] = x
            return out.view(b, length, *x.shape[1:]).transpose(1, 2)

        qh, kh, vh = padded(q), padded(k), padded(v)
        if groups > 1:
            kh, vh = kh.repeat_interleave(groups, dim=1), vh.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)           # [B, Hq, L, Dh]
        return out.transpose(1, 2).reshape(b * length, *q.shape[1:])[self.slot]     # [N, Hq, Dh]


def forward_tapped(model, batch: PackedBatch, attn, vision, deepstack, tap_layer: int | None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's final hidden states over the batch, and (with `tap_layer`) the language model's hidden
    states of the image tokens after that decoder layer, [M, D] in vision order (None without)."""
    if tap_layer is None:
        return model(batch.token_ids, batch.positions, attn, vision, deepstack), None
    tapped: list[torch.Tensor] = []
    hook = model.model.language_model.layers[tap_layer].register_forward_hook(
        lambda _module, _args, out: tapped.append(out))
    try:
        hidden = model(batch.token_ids, batch.positions, attn, vision, deepstack)
    finally:
        hook.remove()
    return hidden, tapped[0][model._vision_mask(batch.token_ids)]


def packed_loss(model, batch: PackedBatch, unpack: PixelUnpacker | None = None,
                attention=PackedCausalAttention, probe=None, probe_weight: float = 1.0) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over the batch's target tokens; -> (loss, number of targets).

    `unpack` turns compact uint8 pixels into pixel_values on the batch's device (needed when they are compact).
    A batch without any target gives a loss of 0 that still reaches every parameter (never a NaN mean of nothing).
    With a `probe` (patch_labels.VisionProbe) and labelled images, probe_weight x its per-token losses is added:
    over the vision tower's outputs, and over the language model's image tokens after LM_PROBE_LAYER.
    """
    vision, deepstack = None, []
    if batch.grid_thw.numel():
        pixels = batch.pixel_values
        if pixels.dtype == torch.uint8:
            if unpack is None:
                raise ValueError("compact uint8 pixels need packed_loss(..., unpack=PixelUnpacker(pre_cfg))")
            pixels = unpack(pixels)
        dtype = next(model.parameters()).dtype
        vision, deepstack = model.encode_vision(pixels.to(dtype), batch.grid_thw)
    extra = 0.0
    probing = probe is not None and vision is not None and batch.vision_labels.numel() > 0
    if probing:
        extra = probe_weight * probe.loss(vision, batch.vision_labels)
    hidden, image_rows = forward_tapped(model, batch, attention(batch.segment_ids), vision, deepstack,
                                        LM_PROBE_LAYER if probing else None)
    if probing:
        places = token_places(batch.grid_thw, model.cfg.vision.spatial_merge_size)
        extra = extra + probe_weight * probe.position_loss(image_rows, batch.vision_labels, places)
    # Token i is predicted from hidden state i - 1 of the same conversation.
    targets = batch.loss_mask.clone()
    targets[0] = False
    same_segment = torch.zeros_like(targets)
    same_segment[1:] = batch.segment_ids[1:] == batch.segment_ids[:-1]
    targets &= same_segment
    idx = targets.nonzero().squeeze(1)
    if idx.numel() == 0:
        return hidden.sum() * 0.0 + extra, 0
    logits = model.compute_logits(hidden[idx - 1])                                  # [T, V] float32
    return F.cross_entropy(logits, batch.token_ids[idx]) + extra, int(idx.numel())
