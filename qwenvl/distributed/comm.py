"""One tensor-parallel group's collectives, on its own torch.distributed backend object.

Not the default process group: `dist.init_process_group` is one global per process, so a second
tensor-parallel LLM (a test suite, a notebook re-running a cell) could not start while the first lives.
Each LLM builds its own store (rank 0 hosts it on a free port) and its own gloo (CPU) or NCCL (CUDA)
backend, and every collective goes through this object.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist


class Communicator:
    def __init__(self, backend: str, host: str, port: int, rank: int, world: int, timeout_s: float,
                 store: dist.TCPStore | None = None):
        timeout = timedelta(seconds=timeout_s)
        self.rank, self.world = rank, world
        # Rank 0 passes the store it already hosts; workers connect to it.
        self.store = store or dist.TCPStore(host, port, world, is_master=False, timeout=timeout)
        if backend == "gloo":
            self.pg = dist.ProcessGroupGloo(self.store, rank, world, timeout)
        elif backend == "nccl":
            self.pg = dist.ProcessGroupNCCL(self.store, rank, world)
        else:
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")

    @staticmethod
    def host_store(world: int, timeout_s: float) -> dist.TCPStore:
        """Rank 0's rendezvous store on 127.0.0.1, on a port the OS picks (read it from `.port`)."""
        return dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=timedelta(seconds=timeout_s),
                             wait_for_workers=False)

    def all_reduce(self, t: torch.Tensor) -> None:
        """Sum `t` over the ranks, in place."""
        self.pg.allreduce([t]).wait()

    def broadcast(self, t: torch.Tensor, src: int = 0) -> None:
        self.pg.broadcast(t, src).wait()

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `t` (same shape everywhere), in rank order."""
        parts = [torch.empty_like(t) for _ in range(self.world)]
        self.pg.allgather([parts], [t]).wait()
        return parts
