"""Paged KV cache and the per-step attention backend the engine hands to the model.

The pool keeps, per layer, k and v as [num_blocks, block_size, Hkv, Dh]; token t of a sequence
lives in slot block_table[t // block_size] * block_size + t % block_size. A step is a batch of
sequences, each contributing the chunk of new tokens [ctx - q_len, ctx) (a prefill chunk or one
decode token); their q/k/v rows are concatenated in sequence order. `attend()` writes the new k/v
into their slots, then lets every query attend causally to all of its sequence's keys.

Two implementations, chosen at construction (and, for a decode-only step on a CPU, qwenvl's decode-attention
kernel in place of either's decode path where it runs: `_kernel_isa`):
  * "reference": per sequence, gather its keys, repeat kv heads for GQA, SDPA with an explicit
    boolean causal-with-offset mask. Plain and slow; the oracle in tests.
  * "fast": every single-token decode in the batch in one padded gather + one batched attention (two
    float32 matmuls on a CPU, SDPA elsewhere); prefill chunks one SDPA call each (is_causal when the
    chunk has no cached prefix). Index tensors are built once per step and shared by all layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels


class PagedKVPool:
    """Per-layer paged k/v storage."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """KV bytes one block costs across all layers (k and v)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * itemsize

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype


def _slots(block_table: list[int], start: int, end: int, block_size: int) -> torch.Tensor:
    """LongTensor[end - start] (CPU): the slots of tokens start .. end-1."""
    t = torch.arange(start, end)
    return torch.tensor(block_table, dtype=torch.long)[t // block_size] * block_size + t % block_size


class PagedAttention:
    """Attention backend for one engine step over a PagedKVPool.

    block_tables[i]: sequence i's block ids; context_lens[i]: its tokens once this step's are added;
    query_lens[i]: new tokens it contributes this step (1 for a decode)."""

    def __init__(self, pool: PagedKVPool, block_tables: list[list[int]], context_lens: list[int],
                 query_lens: list[int], scale: float | None = None, impl: str = "fast"):
        if impl not in ("fast", "reference"):
            raise ValueError(f"impl must be 'fast' or 'reference', got {impl!r}")
        if not (len(block_tables) == len(context_lens) == len(query_lens)):
            raise ValueError("block_tables, context_lens and query_lens must have one entry per sequence")
        bs = pool.block_size
        for i, (bt, c, q) in enumerate(zip(block_tables, context_lens, query_lens)):
            if not 1 <= q <= c or len(bt) * bs < c:
                raise ValueError(f"sequence {i}: query_len={q}, context_len={c}, {len(bt)} blocks of {bs}")
        self.pool = pool
        self.impl = impl
        self.block_tables = block_tables      # kept for tensor-parallel workers, which rebuild this step on their pools
        self.scale = scale
        self.context_lens = list(context_lens)
        self.query_lens = list(query_lens)
        self.num_tokens = sum(query_lens)
        self.q_starts = [0]
        for q in query_lens:
            self.q_starts.append(self.q_starts[-1] + q)
        # The PyTorch paths' index tensors (_plan) and the kernel's tables (_kernel_tables) are built on
        # the first attend that needs them, once per step: a decode step on the kernel never builds the
        # per-token slot lists (a few ops per sequence per step).
        self._planned = False
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None
        self._decode_only = impl == "fast" and all(q == 1 for q in query_lens)

    @property
    def slot_mapping(self) -> torch.Tensor:
        """LongTensor[N]: the slot each new token's k/v goes to."""
        self._plan()
        return self._slot_mapping

    def _plan(self) -> None:
        if self._planned:
            return
        self._planned = True
        bs, dev = self.pool.block_size, self.pool.device
        # Where each new token's k/v goes.
        key_slots = [_slots(bt, 0, c, bs) for bt, c in zip(self.block_tables, self.context_lens)]
        self._slot_mapping = torch.cat([ks[c - q:] for ks, c, q in
                                        zip(key_slots, self.context_lens, self.query_lens)]).to(dev)
        # Where each sequence's keys are read from (all of its context).
        self.key_slots = [ks.to(dev) for ks in key_slots]
        if self.impl == "fast":
            self._plan_fast(key_slots, dev)

    # --------------------------------------------------------------- planning
    def _plan_fast(self, key_slots, dev) -> None:
        self.decode_idx = [i for i, q in enumerate(self.query_lens) if q == 1]
        self.prefill_idx = [i for i, q in enumerate(self.query_lens) if q > 1]
        if self.decode_idx:
            lens = [self.context_lens[i] for i in self.decode_idx]
            L = max(lens)
            pad = torch.zeros((len(lens), L), dtype=torch.long)   # pads read slot 0, masked out
            for r, i in enumerate(self.decode_idx):
                pad[r, : lens[r]] = key_slots[i]
            self.decode_slots = pad.to(dev)                                              # [Bd, L]
            # None when every decode row has the same length (always at batch 1): nothing to mask.
            self.decode_mask = None if min(lens) == L else \
                (torch.arange(L).unsqueeze(0) < torch.tensor(lens).unsqueeze(1)).to(dev)  # [Bd, L]
            self.decode_rows = torch.tensor([self.q_starts[i] for i in self.decode_idx], dtype=torch.long, device=dev)
        # Explicit causal masks for prefill chunks that sit after cached tokens.
        self.prefill_masks = {}
        for i in self.prefill_idx:
            q, c = self.query_lens[i], self.context_lens[i]
            if q != c:
                self.prefill_masks[i] = _causal_mask(q, c, dev)

    # ----------------------------------------------------------------- attend
    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q[N, Hq, Dh], k/v[N, Hkv, Dh] -> out[N, Hq, Dh]."""
        assert q.shape[0] == self.num_tokens, (q.shape, self.num_tokens)
        kc = self.pool.k[layer_idx].view(-1, self.pool.num_kv_heads, self.pool.head_dim)   # [slots, Hkv, Dh]
        vc = self.pool.v[layer_idx].view(-1, self.pool.num_kv_heads, self.pool.head_dim)
        isa = _kernel_isa(q, k, v, kc) if self._decode_only else None
        if isa is not None:
            scale = q.shape[-1] ** -0.5 if self.scale is None else self.scale
            return kernels.paged_decode_attention(q, k, v, kc, vc, *self._kernel_tables(), self.pool.block_size,
                                                  scale, isa)
        self._plan()
        kc.index_copy_(0, self._slot_mapping, k if k.dtype == kc.dtype else k.to(kc.dtype))
        vc.index_copy_(0, self._slot_mapping, v if v.dtype == vc.dtype else v.to(vc.dtype))
        if self.impl == "reference":
            return self._attend_reference(q, kc, vc)
        return self._attend_fast(q, kc, vc)

    def decode_kernel_operands(self, dtype: torch.dtype) -> tuple | None:
        """For a compiled decode stack (layers/decode_stack.py): (k pools, v pools, block tables, context lengths,
        block size, scale) where this step's attention runs the decode-attention kernel for q/k/v of `dtype`
        at every layer, else None. The pools are the per-layer [num_blocks, block_size, Hkv, Dh] tensors."""
        pool = self.pool
        if not self._decode_only or pool.device.type != "cpu" or pool.dtype != dtype \
                or dtype not in (torch.float32, torch.bfloat16) or pool.head_dim % 16 \
                or kernels.decode_ops_isa() is None:
            return None
        scale = pool.head_dim ** -0.5 if self.scale is None else self.scale
        return (pool.k, pool.v, *self._kernel_tables(), pool.block_size, scale)

    def _kernel_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(block tables int32 [B, longest], context lengths int32 [B]) for the decode kernel."""
        if self._tables is None:
            width = max(len(bt) for bt in self.block_tables)
            tables = [bt + [0] * (width - len(bt)) for bt in self.block_tables]
            self._tables = (torch.tensor(tables, dtype=torch.int32), torch.tensor(self.context_lens, dtype=torch.int32))
        return self._tables

    def _attend_reference(self, q, kc, vc):
        Hq, Hkv = q.shape[1], kc.shape[1]
        out = torch.empty_like(q)
        for i, (qlen, c) in enumerate(zip(self.query_lens, self.context_lens)):
            s = self.q_starts[i]
            qi = q[s: s + qlen].transpose(0, 1)                              # [Hq, q, Dh]
            ki = kc[self.key_slots[i]].to(q.dtype).transpose(0, 1)          # [Hkv, c, Dh]
            vi = vc[self.key_slots[i]].to(q.dtype).transpose(0, 1)
            ki = ki.repeat_interleave(Hq // Hkv, dim=0)                      # [Hq, c, Dh]
            vi = vi.repeat_interleave(Hq // Hkv, dim=0)
            mask = _causal_mask(qlen, c, q.device)                           # [q, c]
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=self.scale)
            out[s: s + qlen] = o.transpose(0, 1)
        return out

    def _decode_keys(self, kc, vc) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode rows' keys and values, padded to the longest: k/v [Bd, L, Hkv, Dh]."""
        Bd, L = self.decode_slots.shape
        slots = self.decode_slots.view(-1)
        return (kc.index_select(0, slots).view(Bd, L, kc.shape[1], -1),
                vc.index_select(0, slots).view(Bd, L, vc.shape[1], -1))

    def _attend_fast(self, q, kc, vc):
        if not self.prefill_idx and q.device.type == "cpu":      # a decode-only step: its rows are in order
            return decode_attention_matmul(q, *self._decode_keys(kc, vc), self.decode_mask, self.scale)
        gqa = q.shape[1] != kc.shape[1]
        out = torch.empty_like(q)
        if self.decode_idx:
            qd = q.index_select(0, self.decode_rows)                                   # [Bd, Hq, Dh]
            kd, vd = self._decode_keys(kc, vc)
            if q.device.type == "cpu":
                od = decode_attention_matmul(qd, kd, vd, self.decode_mask, self.scale)
            else:
                mask = None if self.decode_mask is None else self.decode_mask[:, None, None, :]   # [Bd, 1, 1, L]
                od = F.scaled_dot_product_attention(
                    qd.unsqueeze(2), kd.transpose(1, 2).to(q.dtype), vd.transpose(1, 2).to(q.dtype),
                    attn_mask=mask, scale=self.scale, enable_gqa=gqa).squeeze(2)
            out.index_copy_(0, self.decode_rows, od)
        for i in self.prefill_idx:
            s, qlen = self.q_starts[i], self.query_lens[i]
            qi = q[s: s + qlen].transpose(0, 1).unsqueeze(0)                              # [1, Hq, q, Dh]
            ki = kc[self.key_slots[i]].to(q.dtype).transpose(0, 1).unsqueeze(0)          # [1, Hkv, c, Dh]
            vi = vc[self.key_slots[i]].to(q.dtype).transpose(0, 1).unsqueeze(0)
            mask = self.prefill_masks.get(i)
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, is_causal=mask is None,
                                               scale=self.scale, enable_gqa=gqa)
            out[s: s + qlen] = o[0].transpose(0, 1)
        return out


def decode_attention_matmul(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                            scale: float | None = None) -> torch.Tensor:
    """One query per sequence: q[B, Hq, Dh], k/v[B, L, Hkv, Dh], mask[B, L] (True: a real key) or None
    -> [B, Hq, Dh]. Scores, softmax and the weighted sum in float32 (k/v are small at one query each).

    On a CPU this is 3-4x faster than SDPA, whose single-query GQA path repeats k/v per query head and
    runs the unfused math kernel; query head h reads kv head h // (Hq / Hkv), as SDPA's enable_gqa does.
    """
    B, Hq, Dh = q.shape
    L, Hkv = k.shape[1], k.shape[2]
    # Batches of one kv head each, [B * Hkv, ...]. k and v go head-major and float32 in one copy each, so
    # that the products need no copy of their own.
    qg = q.reshape(B * Hkv, Hq // Hkv, Dh).float()                            # [B*Hkv, G, Dh]
    kf = k.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format).reshape(B * Hkv, L, Dh)
    vf = v.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format).reshape(B * Hkv, L, Dh)
    s = torch.bmm(qg, kf.transpose(1, 2)).mul_(Dh ** -0.5 if scale is None else scale)      # [B*Hkv, G, L]
    if mask is not None:
        s.view(B, Hkv, -1, L).masked_fill_(~mask[:, None, None, :], float("-inf"))
    o = torch.bmm(torch.softmax(s, dim=-1), vf)                                # [B*Hkv, G, Dh]
    return o.view(B, Hq, Dh).to(q.dtype)


def _kernel_isa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pool: torch.Tensor) -> str | None:
    """The kernels' ISA where qwenvl's decode-attention kernel (csrc/decode_ops_kernel.hpp) runs this step's
    attention, else None. It runs one query per sequence on a CPU, q/k/v in the pool's dtype (float32 or
    bfloat16) with contiguous heads, head_dim a multiple of 16, no gradient. It replaces the two index_copy_ writes, the padded index_select
    gathers, the float32 casts, two bmm and the softmax (~12 ops per layer) with one call that reads each
    key and value once from its slot."""
    dh = q.shape[-1]
    if q.device.type == "cpu" and q.dtype == k.dtype == v.dtype == pool.dtype \
            and q.dtype in (torch.float32, torch.bfloat16) and dh % 16 == 0 \
            and all(t.stride(-1) == 1 and t.stride(-2) == dh for t in (q, k, v)) \
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return kernels.decode_ops_isa()
    return None


def _causal_mask(q_len: int, ctx_len: int, device) -> torch.Tensor:
    """[q, c] bool: query j (absolute position ctx - q + j) sees keys 0 .. ctx - q + j."""
    qpos = torch.arange(ctx_len - q_len, ctx_len, device=device).unsqueeze(1)
    kpos = torch.arange(ctx_len, device=device).unsqueeze(0)
    return kpos <= qpos
