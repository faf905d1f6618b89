"""Build one rank's shard of a model and fill it from the checkpoint, reading only that rank's slices.

The model is built on the meta device as for one process, then the language model's linears, embedding
and head are swapped for the parallel layers of qwenvl/distributed/layers.py (the model files stay unaware
of tensor parallelism). Attention heads are split evenly; when there are fewer KV heads than ranks, each
KV head is replicated on the ranks whose query heads read it. Rank 0 keeps the vision tower; the other
ranks drop it (rank 0 encodes images and broadcasts the embeddings).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..models.config import ModelConfig
from ..models.registry import config_from_dir
from ..checkpoints.loader import LoadError, checkpoint_tensors, prequantized_weights
from ..models import build_model
from ..checkpoints.safetensors_reader import SafetensorsReader
from .comm import Communicator
from .layers import (ColumnParallelLinear, ParallelExperts, RowParallelLinear, VocabParallelEmbedding,
                     VocabParallelHead, split_range)

VISION_PREFIX = "model.visual."
EXPERT_SUFFIXES = (".experts.gate_up_proj", ".experts.down_proj")
# The attention modules of the two decoders name their head counts differently (qwen2_vl/text.py, qwen3_vl/text.py).
_HEAD_ATTRS = (("num_heads", "num_kv_heads"), ("hq", "hkv"))


def check_tensor_parallel(cfg: ModelConfig, world: int) -> None:
    """Raise ValueError naming the problem when `cfg`'s language model cannot be split over `world` ranks."""
    t = cfg.text
    if t.num_experts and t.num_experts < world:
        raise ValueError(f"tensor_parallel_size={world} is more than num_experts={t.num_experts}: every rank "
                         "needs at least one expert")
    if t.num_attention_heads % world:
        raise ValueError(f"tensor_parallel_size={world} must divide num_attention_heads={t.num_attention_heads}")
    hkv = t.num_key_value_heads
    if (hkv >= world and hkv % world) or (hkv < world and world % hkv):
        raise ValueError(f"tensor_parallel_size={world} and num_key_value_heads={hkv}: one must divide the other")
    if t.intermediate_size % world:
        raise ValueError(f"tensor_parallel_size={world} must divide intermediate_size={t.intermediate_size}")


def local_kv_heads(num_kv_heads: int, world: int) -> int:
    """KV heads each rank holds (one, replicated, when there are fewer KV heads than ranks)."""
    return max(1, num_kv_heads // world)


def _kv_head_range(num_kv_heads: int, rank: int, world: int) -> tuple[int, int]:
    if num_kv_heads >= world:
        return split_range(num_kv_heads, rank, world)
    first = rank * num_kv_heads // world            # ranks sharing a KV head hold consecutive query heads
    return first, first + 1


def shard_model(model: nn.Module, cfg: ModelConfig, comm: Communicator) -> None:
    """Swap the language model's layers for this rank's parallel ones (on the meta device, before loading)."""
    t = cfg.text
    rank, world = comm.rank, comm.world
    d, dh = t.hidden_size, t.head_dim
    q0, q1 = split_range(t.num_attention_heads, rank, world)
    k0, k1 = _kv_head_range(t.num_key_value_heads, rank, world)
    i_range = split_range(t.intermediate_size, rank, world)
    lm = model.model.language_model
    for i, layer in enumerate(lm.layers):
        a = layer.self_attn
        bias = a.q_proj.bias is not None
        a.q_proj = ColumnParallelLinear(d, t.num_attention_heads * dh, (q0 * dh, q1 * dh), bias)
        a.k_proj = ColumnParallelLinear(d, t.num_key_value_heads * dh, (k0 * dh, k1 * dh), bias)
        a.v_proj = ColumnParallelLinear(d, t.num_key_value_heads * dh, (k0 * dh, k1 * dh), bias)
        a.o_proj = RowParallelLinear(t.num_attention_heads * dh, (q0 * dh, q1 * dh), d,
                                     a.o_proj.bias is not None, comm)
        for heads, kv_heads in _HEAD_ATTRS:
            if hasattr(a, heads):
                setattr(a, heads, q1 - q0)
                setattr(a, kv_heads, k1 - k0)
        m = layer.mlp
        if t.is_sparse_layer(i):                    # whole experts per rank; the router stays replicated
            m.experts = ParallelExperts(t.num_experts, d, t.moe_intermediate_size,
                                        split_range(t.num_experts, rank, world), comm)
            continue
        m.gate_proj = ColumnParallelLinear(d, t.intermediate_size, i_range, m.gate_proj.bias is not None)
        m.up_proj = ColumnParallelLinear(d, t.intermediate_size, i_range, m.up_proj.bias is not None)
        m.down_proj = RowParallelLinear(t.intermediate_size, i_range, d, m.down_proj.bias is not None, comm)
    vocab = split_range(t.vocab_size, rank, world)
    lm.embed_tokens = VocabParallelEmbedding(t.vocab_size, d, vocab, comm)
    if not t.tie_word_embeddings:
        model.lm_head = ColumnParallelLinear(d, t.vocab_size, vocab, bias=False)
    if rank != 0:
        del model.model.visual


def load_shard(model_dir: str | Path, comm: Communicator, dtype: torch.dtype,
               device: torch.device) -> tuple[nn.Module, ModelConfig]:
    """This rank's model, filled strictly from the checkpoint: every parameter from its slice of the file."""
    model_dir = Path(model_dir)
    cfg = config_from_dir(model_dir)
    if prequantized_weights(model_dir, dtype) is not None:
        raise LoadError(f"{model_dir}: a pre-quantised checkpoint (quantization_config) cannot be split over "
                        "processes yet; load it with tensor_parallel_size=1")
    rank = comm.rank
    check_tensor_parallel(cfg, comm.world)
    with torch.device("meta"):
        model = build_model(cfg)
        shard_model(model, cfg, comm)
    expected = model.state_dict()
    ignored = ("lm_head.weight",) if cfg.text.tie_word_embeddings else ()
    def skip(key: str) -> bool:
        return key in ignored or (rank != 0 and key.startswith(VISION_PREFIX))

    state: dict[str, torch.Tensor] = {}
    for f, sf, raw_key, key in checkpoint_tensors(model_dir, expected, skip):
        in_out = cfg.text.experts_stored_in_out and key.endswith(EXPERT_SUFFIXES)
        t = _read(sf, f, raw_key, key, model, tuple(expected[key].shape), in_out)
        state[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous().to(device)
    model.load_state_dict(state, strict=True, assign=True)
    lm = model.model.language_model
    head_weight = lm.embed_tokens.weight if cfg.text.tie_word_embeddings else model.lm_head.weight
    model.use_output_head(VocabParallelHead(head_weight, cfg.text.vocab_size, comm))
    return model.eval(), cfg


def _read(sf: SafetensorsReader, f: Path, raw_key: str, key: str, model: nn.Module,
          want: tuple[int, ...], in_out: bool) -> torch.Tensor:
    """The rank's slice of one checkpoint tensor, its full shape checked against config.json first.
    `in_out`: a fused expert tensor stored [E, in, out] (the Hub's MoE files), returned as the model's [E, out, in]."""
    module_name, _, param = key.rpartition(".")
    spec = getattr(model.get_submodule(module_name), "checkpoint_slice", None)
    spec = spec(param) if spec else None
    full = list(sf.shape(raw_key))
    if in_out:
        full[1], full[2] = full[2], full[1]
    if spec is None:
        if tuple(full) != want:
            raise LoadError(f"{f.name}: tensor {raw_key!r} has shape {tuple(full)}, the model expects {want}")
        return sf.get_tensor(raw_key)
    dim, start, stop, full_size = spec
    want_full = list(want)
    want_full[dim] = full_size
    if full != want_full:
        raise LoadError(f"{f.name}: tensor {raw_key!r} has shape {tuple(full)}, the model expects "
                        f"{tuple(want_full)} (from config.json)")
    t = sf.get_slice(raw_key, dim, start, stop)
    return t.transpose(1, 2) if in_out else t           # made contiguous by the caller
