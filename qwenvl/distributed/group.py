"""Rank 0's side of tensor parallelism: start the worker processes, drive every step, stop them.

`TensorParallelGroup(model_dir, dtype, device, world)` spawns ranks 1..N-1 (torch.multiprocessing, spawn),
joins them in the group's own torch.distributed backend (comm.py: gloo on CPU, NCCL on CUDA), loads rank 0's
own shard and
waits for every worker to load its own. `group.model` then stands in for the model in the engine's runner:
its `forward` and `compute_logits` first send the step to the workers, then run rank 0's shard, whose
collectives meet the workers' ones. The scheduler, encoder cache and sampler live only on rank 0.

Failure is never a hang: before each step the workers' liveness is checked; a worker that dies mid-step
closes its sockets (gloo then fails at once) or, at worst, the collective timeout fires. Either way the group
is marked broken and every later step raises TensorParallelError; `shutdown()` (also run on garbage
collection and at interpreter exit) stops and reaps every worker.
"""

from __future__ import annotations

import threading
import time
import weakref
from pathlib import Path

import torch
import torch.multiprocessing as mp
from ..models.registry import config_from_dir
from .comm import Communicator
from .shard import check_tensor_parallel, load_shard, local_kv_heads
from .worker import StepInputs, WorkerSpec, worker_main

COLLECTIVE_TIMEOUT_S = 300.0     # the longest one rank may wait for another inside one step (or at start)
STOP_GRACE_S = 10.0


class TensorParallelError(RuntimeError):
    """A tensor-parallel worker failed or died; the LLM must be shut down and created again."""


class TensorParallelGroup:
    def __init__(self, model_dir: str | Path, dtype: torch.dtype, device: torch.device, world: int):
        cfg = config_from_dir(model_dir)
        check_tensor_parallel(cfg, world)        # a ValueError before any process starts
        if device.type == "cuda":
            first = device.index or 0
            if first + world > torch.cuda.device_count():
                raise ValueError(f"tensor_parallel_size={world} from {device} needs GPUs {first}..{first + world - 1}, "
                                 f"but torch sees {torch.cuda.device_count()}")
            devices = [torch.device("cuda", first + r) for r in range(world)]
            backend, threads = "nccl", 0
        else:
            devices = [device] * world
            backend, threads = "gloo", max(1, torch.get_num_threads() // world)
            torch.set_num_threads(threads)       # N processes share the cores instead of each taking all
        self.world = world
        self.device = devices[0]
        self.dtype = dtype
        self.broken: str | None = None
        ctx = mp.get_context("spawn")
        self._procs, self._conns = [], []
        self._finalizer = weakref.finalize(self, _stop_workers, self._procs, self._conns)
        try:
            store = Communicator.host_store(world, COLLECTIVE_TIMEOUT_S)
            for r in range(1, world):
                parent, child = ctx.Pipe()
                spec = WorkerSpec(str(model_dir), r, world, store.port, backend, str(devices[r]),
                                  str(dtype).removeprefix("torch."), COLLECTIVE_TIMEOUT_S, threads)
                p = ctx.Process(target=worker_main, args=(spec, child), name=f"qwenvl-tp-rank{r}", daemon=True)
                p.start()
                child.close()
                self._procs.append(p)
                self._conns.append(parent)
            if backend == "nccl":
                torch.cuda.set_device(self.device)
            self.comm = self._join(backend, store)
            self.shard, self.cfg = load_shard(model_dir, self.comm, dtype, self.device)
            self._expect("loaded")
        except BaseException:
            self.shutdown()
            raise
        self.num_local_kv_heads = local_kv_heads(self.cfg.text.num_key_value_heads, world)
        self.model = TensorParallelModel(self)

    # ------------------------------------------------------------- lifecycle
    def _join(self, backend: str, store) -> Communicator:
        """Form the group with the workers, failing fast when one dies before it joins."""
        err: list[BaseException] = []
        made: list[Communicator] = []

        def join():
            try:
                made.append(Communicator(backend, "127.0.0.1", store.port, 0, self.world, COLLECTIVE_TIMEOUT_S, store))
            except BaseException as e:   # noqa: BLE001 - re-raised in the caller's thread
                err.append(e)

        t = threading.Thread(target=join, name="qwenvl-tp-init", daemon=True)
        t.start()
        while t.is_alive():
            t.join(0.1)
            self._check_alive()
        if err:
            raise TensorParallelError(f"tensor-parallel group did not form: {err[0]}") from err[0]
        return made[0]

    def _expect(self, reply: str) -> None:
        """Wait until every worker answers `reply`; a worker's error or death raises with its message."""
        for r, (p, conn) in enumerate(zip(self._procs, self._conns), start=1):
            while not conn.poll(0.1):
                if not p.is_alive():
                    self._check_alive()
            msg = conn.recv()
            if msg[0] != reply:
                raise TensorParallelError(f"tensor-parallel rank {r} failed:\n{msg[1] if len(msg) > 1 else msg}")

    def allocate_kv(self, num_blocks: int, block_size: int) -> None:
        """Every worker allocates its shard of the paged KV cache: the same block ids as rank 0."""
        self.send(("kv", num_blocks, block_size))
        self._expect("ready")

    def _check_alive(self) -> None:
        dead = self._dead_workers()
        if dead:
            self.broken = dead
            raise TensorParallelError(self.broken)

    def _dead_workers(self) -> str:
        """One line per worker that has exited (with the error it reported, if any); "" when all live."""
        lines = []
        for r, p in enumerate(self._procs, start=1):
            if not p.is_alive():
                detail = self._worker_error(r - 1)
                lines.append(f"tensor-parallel worker rank {r} (pid {p.pid}) exited with code {p.exitcode}"
                             + (f":\n{detail}" if detail else ""))
        return "\n".join(lines)

    def _worker_error(self, i: int) -> str:
        try:
            if self._conns[i].poll(0):
                msg = self._conns[i].recv()
                return msg[1] if msg[0] == "error" else ""
        except (EOFError, OSError):
            pass
        return ""

    def send(self, msg: tuple) -> None:
        if self.broken:
            raise TensorParallelError(f"{self.broken}\n(shut this LLM down and create a new one)")
        self._check_alive()
        try:
            for conn in self._conns:
                conn.send(msg)
        except OSError as e:
            self.broken = f"tensor-parallel worker unreachable: {e}"
            raise TensorParallelError(self.broken) from e

    def run_collective(self, fn):
        """fn() with the workers in lockstep; any failure breaks the group (the ranks are out of step)."""
        try:
            return fn()
        except BaseException as e:
            deadline = time.monotonic() + 2.0            # a worker whose socket closed is about to be reaped
            while not (dead := self._dead_workers()) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.broken = (dead + "\n" if dead else "") + f"tensor-parallel step failed: {e}"
            raise TensorParallelError(self.broken) from e

    def shutdown(self) -> None:
        """Stop every worker (politely, then by force); idempotent. Later steps raise TensorParallelError."""
        self.broken = self.broken or "this tensor-parallel LLM was shut down"
        self._finalizer()

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs]


def _stop_workers(procs: list, conns: list) -> None:
    for conn in conns:
        try:
            conn.send(("stop",))
        except OSError:
            pass
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(5.0)
    for conn in conns:
        conn.close()


class TensorParallelModel:
    """Rank 0's model for the runner: the family interface (`encode_vision`, `forward`, `compute_logits`)
    over rank 0's shard, with each call mirrored on the workers first."""

    def __init__(self, group: TensorParallelGroup):
        self._group = weakref.proxy(group)       # the engine owns the group; the model must not keep it alive
        self.shard = group.shard
        self.cfg = group.cfg

    def encode_vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        return self.shard.encode_vision(pixel_values, grid_thw)     # the vision tower lives on rank 0 only

    def forward(self, input_ids, positions, attn, vision_embeds=None, deepstack=()):
        g = self._group
        deepstack = list(deepstack or [])
        if vision_embeds is not None:
            vision_embeds = vision_embeds.to(g.dtype).contiguous()
            deepstack = [d.to(g.dtype).contiguous() for d in deepstack]
        g.send(("forward", StepInputs(
            input_ids.cpu().numpy(), positions.cpu().numpy(), attn.block_tables, attn.context_lens,
            attn.query_lens, attn.scale, attn.impl,
            tuple(vision_embeds.shape) if vision_embeds is not None else None, len(deepstack))))

        def step():
            if vision_embeds is not None:
                for t in [vision_embeds, *deepstack]:
                    g.comm.broadcast(t)
            return self.shard.forward(input_ids, positions, attn, vision_embeds, deepstack)
        return g.run_collective(step)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        g = self._group
        hidden = hidden.to(g.dtype).contiguous()
        g.send(("logits", hidden.shape[0]))

        def step():
            g.comm.broadcast(hidden)
            return self.shard.compute_logits(hidden)
        return g.run_collective(step)
