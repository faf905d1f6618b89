"""libgomp's idle spinning for `qwenvl serve`, chosen before torch loads libgomp (issue 37).

After each parallel region, PyTorch's OpenMP worker threads spin (GOMP's default: ~300,000 turns) before
they sleep. A server has more busy threads than that: the engine thread, the event loop, tokenising and
image-decoding threads, and the clients on the same machine. Spinning workers take cores from them: on the
bundled model a batch-1 decode step took 43 ms (median) with the default spin and 6.8 ms with 10,000 turns on
a loaded 2-core VM (bench/gomp_spin.py), and a quiet run of bench/vs_llama_server.py had 1-client output
tokens/s 299 -> 358, inter-token latency p50 2.7 -> 1.9 ms. A long batch-1 decode of a 2B model alone on
a quiet machine may lose a little (85.7 vs 90.4 ms a step once), which is why only the server sets it.

libgomp reads GOMP_SPINCOUNT once, when it is loaded, so the server entry sets it before torch is imported;
a user's own GOMP_SPINCOUNT, or OMP_WAIT_POLICY (which sets the spinning another way), is left as it is.
Child processes (replica workers, tensor-parallel ranks) inherit it.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SPIN_ENV = "GOMP_SPINCOUNT"
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
SERVER_SPIN_COUNT = "10000"


def quiet_spinning(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set GOMP_SPINCOUNT to SERVER_SPIN_COUNT unless the user chose the spinning; whether it was set."""
    if SPIN_ENV in environ or WAIT_POLICY_ENV in environ:
        return False
    environ[SPIN_ENV] = SERVER_SPIN_COUNT
    return True
