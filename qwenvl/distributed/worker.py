"""A tensor-parallel worker process (ranks 1..N-1): load this rank's shard, then run each step rank 0 sends.

Control messages come over a multiprocessing pipe from rank 0 (a worker may wait for the next request for
hours, which no collective timeout should cover); tensors too large to pickle cheaply (vision embeddings,
the hidden rows to project) come by broadcast, and the layers' own collectives do the rest. The worker ends
on "stop", when the pipe closes (rank 0 gone), or on its first error, which it reports before exiting.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass

import torch

from ..layers.paged_attention import PagedAttention, PagedKVPool
from .comm import Communicator


@dataclass(frozen=True)
class WorkerSpec:
    model_dir: str
    rank: int
    world: int
    store_port: int         # rank 0's rendezvous store on 127.0.0.1
    backend: str            # "gloo" (CPU) or "nccl" (CUDA)
    device: str             # this rank's device
    dtype: str
    timeout_s: float
    num_threads: int


@dataclass(frozen=True)
class StepInputs:
    """What a worker needs to repeat rank 0's forward: the batch and its attention layout."""
    input_ids: object       # numpy int64 [N]
    positions: object       # numpy int64 [3, N]
    block_tables: list[list[int]]
    context_lens: list[int]
    query_lens: list[int]
    scale: float | None
    attn_impl: str
    vision_shape: tuple[int, int] | None      # [K, D] embeddings broadcast after this message
    num_deepstack: int                        # [K, D] each, broadcast after the embeddings


def worker_main(spec: WorkerSpec, conn) -> None:
    try:
        if spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        device = torch.device(spec.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        comm = Communicator(spec.backend, "127.0.0.1", spec.store_port, spec.rank, spec.world, spec.timeout_s)
        from .shard import load_shard
        dtype = getattr(torch, spec.dtype)
        model, cfg = load_shard(spec.model_dir, comm, dtype, device)
        conn.send(("loaded",))
        _serve(model, cfg, comm, spec, dtype, device, conn)
    except (EOFError, KeyboardInterrupt):
        pass                                                     # rank 0 went away or the user stopped us
    except BaseException:                                        # noqa: BLE001 - reported to rank 0
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        os._exit(1)                                              # closes our sockets: rank 0's collectives fail fast


@torch.inference_mode()
def _serve(model, cfg, comm: Communicator, spec: WorkerSpec, dtype: torch.dtype, device: torch.device, conn) -> None:
    from .shard import local_kv_heads
    pool = None
    text = cfg.text
    while True:
        msg = conn.recv()
        kind = msg[0]
        if kind == "stop":
            return
        if kind == "kv":                                        # ("kv", num_blocks, block_size)
            pool = PagedKVPool(text.num_hidden_layers, msg[1], msg[2],
                               local_kv_heads(text.num_key_value_heads, spec.world), text.head_dim, dtype, device)
            conn.send(("ready",))
        elif kind == "forward":                                 # ("forward", StepInputs)
            s: StepInputs = msg[1]
            vision, deepstack = None, []
            if s.vision_shape is not None:
                vision = torch.empty(s.vision_shape, dtype=dtype, device=device)
                comm.broadcast(vision)
                for _ in range(s.num_deepstack):
                    d = torch.empty(s.vision_shape, dtype=dtype, device=device)
                    comm.broadcast(d)
                    deepstack.append(d)
            attn = PagedAttention(pool, s.block_tables, s.context_lens, s.query_lens, scale=s.scale,
                                  impl=s.attn_impl)
            model.forward(torch.from_numpy(s.input_ids).to(device), torch.from_numpy(s.positions).to(device),
                          attn, vision, deepstack)
        elif kind == "logits":                                  # ("logits", rows): hidden[rows, D] broadcast
            hidden = torch.empty((msg[1], text.hidden_size), dtype=dtype, device=device)
            comm.broadcast(hidden)
            model.compute_logits(hidden)
        else:
            raise RuntimeError(f"tensor-parallel worker {spec.rank}: unknown message {kind!r}")
