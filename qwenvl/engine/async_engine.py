"""The engine for asyncio servers: one background thread runs `LLMEngine.step()`; requests stream out.

Only the engine thread touches the engine. Requests and aborts reach it through a command queue and are
applied between steps, so the event loop never waits for a model step. A structured request's grammar is
compiled before the request is admitted, on the compile threads (grammar_compiles.py): a slow compile stalls
neither the step loop nor the event loop, and a request whose client left while it compiled never reaches
the engine.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from typing import AsyncIterator

from ..inputs import PromptInputs
from ..answers.outputs import RequestOutput
from ..sampling_params import SamplingParams
from .errors import EngineFull, EngineStopped
from .grammar_compiles import GrammarCompiles
from .info import EngineInfo, engine_info
from .llm_engine import LLMEngine

_ids = itertools.count()


QueueFull = EngineFull   # the old name, kept for callers that import it from here


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queue: int = 256, grammar_timeout_s: float = 10.0):
        self.engine = engine
        self.max_queue = max_queue
        self.grammars = GrammarCompiles(engine.compile_grammar, grammar_timeout_s)
        self._heartbeat = time.monotonic()     # the engine thread's last turn of its loop
        self._stopped: EngineStopped | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._compiling: set[str] = set()     # requests whose grammar compiles (not yet in the engine)
        self._stats: dict = engine.stats()
        self._info = engine_info(engine)
        self._thread = threading.Thread(target=self._run, name="qwenvl-engine", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- front end
    def info(self) -> EngineInfo:
        """The typed facts front ends may read (model name, context length, device, ...)."""
        return self._info

    async def prepare(self, messages, chat_template_kwargs: dict | None = None,
                      tools: list[dict] | None = None) -> PromptInputs:
        """Decode and preprocess off the event loop; raises InputError for bad input."""
        return await asyncio.get_running_loop().run_in_executor(
            None, self.engine.prepare, messages, chat_template_kwargs, tools)

    @property
    def alive(self) -> bool:
        """Whether the engine thread still runs (a health check for supervisors such as Ray Serve)."""
        return self._thread.is_alive()

    @property
    def num_active(self) -> int:
        return len(self._streams)

    def stalled_for(self) -> float:
        """Seconds the engine thread has not come round its loop while requests wait on it; 0 when idle. The
        loop turns at least every 0.5 s when idle and after every step, so a large value means a stuck step."""
        if not self._streams or self._compiling_only():
            return 0.0
        return max(0.0, time.monotonic() - self._heartbeat)

    def compiles_running(self) -> int:
        """Grammar compiles running now (xgrammar's cannot be interrupted: a process leaving must not wait)."""
        return self.grammars.running

    def _compiling_only(self) -> bool:
        return len(self._compiling) == len(self._streams)

    async def generate(self, prompt: PromptInputs, params: SamplingParams,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; the last has `finished` set. Leaving the loop early (a client
        that went away) aborts the request and frees its KV blocks."""
        if self._stopping:
            raise EngineStopped("the server is shutting down")
        if len(self._streams) >= self.max_queue:
            raise EngineFull(f"{len(self._streams)} requests in flight (limit {self.max_queue})")
        rid = request_id or f"req-{next(_ids)}"
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), stream)
        finished = False
        try:
            grammar = None
            if params.structured is not None:
                grammar = await self._compile(rid, params.structured, stream)
            self._send(("add", rid, prompt, params, grammar))
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    # not marked finished: the abort below is a no-op for a request the engine refused, and
                    # frees one a shutdown failed just as the engine admitted it
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self._send(("abort", rid))

    async def _compile(self, rid: str, spec, stream: asyncio.Queue):
        """The request's grammar, compiled off the engine thread; a stop (shutdown) delivered to the request's
        stream meanwhile ends the wait at once."""
        self._compiling.add(rid)
        compiled = asyncio.ensure_future(self.grammars.compile(spec))
        stopped = asyncio.ensure_future(stream.get())
        try:
            await asyncio.wait({compiled, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if stopped.done():
                raise stopped.result()        # only errors reach a stream before its request is added
            return compiled.result()
        finally:
            self._compiling.discard(rid)
            for task in (compiled, stopped):
                task.cancel()

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def fail_all(self, reason: str = "the server is shutting down") -> int:
        """From any thread: end every request in flight (queued, compiling or running) with EngineStopped, so
        each answers a proper 503 (or ends its stream with an in-band error); returns how many."""
        self._stopping = True
        rids = list(self._streams)
        for rid in rids:
            self._deliver(rid, EngineStopped(reason))
            self.abort(rid)
        return len(rids)

    def stats(self) -> dict:
        """The engine's counters as of the last step (read without stopping the engine)."""
        return dict(self._stats, num_active=len(self._streams), grammar_compiles_running=self.grammars.running,
                    grammar_compiles_queued=self.grammars.queued)

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Refuse new requests, let running ones finish for up to `grace_s`, then abort the rest."""
        self._stopping = True
        deadline = time.monotonic() + grace_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.fail_all()
        self._send(("stop",))
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5.0)

    def stop_workers(self) -> None:
        """Stop the engine's worker processes (tensor parallelism), for a process about to leave without the
        garbage collection that would otherwise do it; call after shutdown()."""
        self.engine.shutdown()

    # ---------------------------------------------------------- engine thread
    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    def _deliver(self, rid: str, item) -> None:
        self._deliver_all([(rid, item)])

    def _deliver_all(self, items: list[tuple[str, object]]) -> None:
        """Hand items to their requests' streams with one call into each event loop, not one per request: a
        thread-safe call writes to the loop's wake-up pipe and wakes it, 32 times a step at 32 clients."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for rid, item in items:
            target = self._streams.get(rid)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, pairs in by_loop.items():
            loop.call_soon_threadsafe(_put_all, pairs)

    def _apply(self, command: tuple) -> bool:
        kind = command[0]
        if kind == "stop":
            return False
        if kind == "add":
            _, rid, prompt, params, grammar = command
            if rid not in self._streams:         # its client left (or it was failed) on the way here
                return True
            try:
                self.engine.add_request(rid, prompt, params, grammar)
            except ValueError as e:              # too long for the context or the KV cache
                self._deliver(rid, e)
        elif kind == "abort":
            self.engine.abort(command[1])
        return True

    def _run(self) -> None:
        running = True
        while running:
            self._heartbeat = time.monotonic()
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=0.5)
            self._wake.clear()
            while True:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    break
                running = self._apply(command) and running
            if not running or not self.engine.has_unfinished():
                self._stats = self.engine.stats()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:               # a bug or device failure: fail the live requests, keep serving
                for rid in list(self._streams):
                    self.engine.abort(rid)
                    self._deliver(rid, RuntimeError(f"engine step failed: {type(e).__name__}: {e}"))
                outputs = []
            self._stats = self.engine.stats()
            self._deliver_all([(out.request_id, out) for out in outputs])


def _put_all(pairs: list[tuple[asyncio.Queue, object]]) -> None:
    for stream, item in pairs:
        stream.put_nowait(item)
