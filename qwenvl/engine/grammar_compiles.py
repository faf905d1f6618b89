"""Grammar compiles for the async engine: on their own threads, with a deadline, never on the step loop.

A large schema compiles for seconds to minutes (xgrammar, about cubic in its size). Done inside
`LLMEngine.add_request` on the engine thread, it stopped every other request for as long. Here a request's
grammar is compiled before the request is admitted, on a small pool of daemon threads: xgrammar releases
the GIL while it compiles (measured: a 10 ms ticker thread kept ticking, longest gap 80 ms, through a 19 s
compile), so the engine thread and the event loop run on meanwhile.

A compile cannot be interrupted once it runs. A client that leaves, a deadline that passes or a shutdown
drops the compile's result: a queued compile is cancelled, a running one ends on its own and its grammar
is discarded (it holds no KV blocks; the request was never admitted). The threads are daemons, so a
compile still running never holds up the process's exit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import threading
from typing import Callable

from .errors import GrammarCompileTimeout


class GrammarCompiles:
    def __init__(self, compile_fn: Callable, timeout_s: float = 10.0, workers: int | None = None):
        self._compile_fn = compile_fn
        self.timeout_s = timeout_s
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        # one compile thread per 4 cores (at least one, at most 2): compiles never take the cores the steps use
        self._workers = workers or max(1, min(2, (os.cpu_count() or 1) // 4))
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.running = 0                      # compiles on a thread right now (tests and /metrics read it)

    @property
    def queued(self) -> int:
        """Compiles waiting for a thread (cancelled ones count until a thread skips them)."""
        return self._jobs.qsize()

    def submit(self, spec) -> concurrent.futures.Future:
        self._start_threads()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((spec, future))
        return future

    async def compile(self, spec, timeout_s: float | None = None):
        """The compiled grammar; raises the compiler's error (InvalidStructuredOutputError, a ValueError) or
        GrammarCompileTimeout. Cancelling the awaiting task drops the compile."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        future = self.submit(spec)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
        except asyncio.TimeoutError:
            raise GrammarCompileTimeout(f"did not compile within {timeout_s:g} s") from None
        finally:
            future.cancel()                   # a no-op once it runs or ran; a queued one never starts

    def _start_threads(self) -> None:
        with self._lock:
            while len(self._threads) < self._workers:
                t = threading.Thread(target=self._work, name=f"qwenvl-grammar-{len(self._threads)}", daemon=True)
                t.start()
                self._threads.append(t)

    def _work(self) -> None:
        _lower_priority()
        while True:
            spec, future = self._jobs.get()
            if not future.set_running_or_notify_cancel():
                continue                      # its client left (or its deadline passed) while it queued
            with self._lock:
                self.running += 1
            try:
                result = self._compile_fn(spec)
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting request
                future.set_exception(e)
            else:
                future.set_result(result)
            finally:
                with self._lock:
                    self.running -= 1


def _lower_priority() -> None:
    """Nice this thread (Linux schedules threads as tasks): the step loop and the event loop keep the CPU they
    need while a compile runs beside them on a busy machine."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):          # not Linux, or not permitted: compile at normal priority
        pass
