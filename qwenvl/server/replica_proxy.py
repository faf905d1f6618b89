"""The HTTP front's engine when `serve --replicas N` runs: the AsyncEngine contract over N replica handles.

`ReplicaEngine` has the methods front ends use (info, prepare, generate, abort, stats, shutdown), so the
server and web UI run unchanged on top of it. Each call goes to one replica through its Ray Serve
deployment handle; generate streams the replica's RequestOutputs back as they come.

Routing (`pick_replica`): a request whose prompt has an image goes to the replica chosen by rendezvous
hashing of the first image's content hash over the replica names - the replica whose encoder and prefix
caches already hold that image - unless that replica has `spill` more requests in flight than the least
loaded one; everything else goes to the replica with the fewest requests in flight. Replicas whose last
stats poll failed (dead, restarting) are skipped while any other is up.

`ReplicaHeader` (ASGI) adds `X-Qwenvl-Replica` to every response: the replica(s) that generated it, else the
one that prepared it, else `none` (the front answered alone: a bad request, /health, /metrics).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import threading
import time
from contextvars import ContextVar
from typing import AsyncIterator

from ..engine.errors import EngineFull

log = logging.getLogger("qwenvl.server")

HEADER = b"x-qwenvl-replica"
_ids = itertools.count()
# The ASGI middleware puts a fresh dict here per HTTP request; the engine calls made for that request
# write which replica served them. (A dict, not a value: the engine's calls run in copied contexts.)
_served_by: ContextVar[dict | None] = ContextVar("qwenvl_served_by", default=None)


def pick_replica(names: list[str], key: str | None, running: dict[str, int], spill: int = 4,
                 up: dict[str, bool] | None = None) -> str:
    """The replica for a request: affinity by `key` (rendezvous hashing), else the least loaded."""
    live = [n for n in names if up is None or up.get(n, True)] or list(names)
    least = min(live, key=lambda n: (running.get(n, 0), n))
    if key is None:
        return least
    home = max(live, key=lambda n: hashlib.sha256(f"{key}|{n}".encode()).digest())
    return home if running.get(home, 0) - running.get(least, 0) < spill else least


def _note(kind: str, name: str) -> None:
    holder = _served_by.get()
    if holder is not None:
        holder.setdefault(kind, []).append(name)


def _unwrap(exc: BaseException) -> BaseException:
    """A replica's exception arrives wrapped by Ray; the front's error handling wants the original
    (InputError -> 400, EngineFull -> 429, ValueError -> 400)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class ReplicaEngine:
    """AsyncEngine's front-end contract, served by Ray Serve replicas (see the module docstring)."""

    def __init__(self, handles: dict, info, max_queue: int = 256, spill: int = 4, poll_s: float = 1.0):
        self._handles = dict(handles)              # replica name -> DeploymentHandle
        self.names = sorted(self._handles)
        self._info = info
        self.max_queue = max_queue                 # per replica, as in a single-process server
        self.spill = spill
        self._running = {n: 0 for n in self.names}
        self._served = {n: 0 for n in self.names}
        self._failed = {n: 0 for n in self.names}
        self._up = {n: True for n in self.names}
        self._replica_stats: dict[str, dict] = {n: {} for n in self.names}
        self._owner: dict[str, str] = {}           # request id -> replica running it (for abort)
        self._stopping = False
        self._poll_s = poll_s
        self._stop_poll = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="qwenvl-replica-stats", daemon=True)
        self._poller.start()

    def info(self):
        return self._info

    @property
    def num_active(self) -> int:
        return sum(self._running.values())

    async def prepare(self, messages, chat_template_kwargs: dict | None = None, tools: list[dict] | None = None):
        skip: set[str] = set()
        while True:
            name = self._pick(None, skip)
            _note("prepare", name)
            try:
                return await self._handles[name].prepare.remote(messages, chat_template_kwargs, tools)
            except Exception as e:  # noqa: BLE001 - re-raised as the replica's own exception
                if self._retry_elsewhere(name, e, skip):
                    continue
                raise _unwrap(e) from None

    async def generate(self, prompt, params, request_id: str | None = None) -> AsyncIterator:
        """Stream from one replica. A replica found dead before its first output (killed, restarting) is
        marked down and the request goes to another; after that, a failure ends the request with an error."""
        if self._stopping:
            raise EngineFull("the server is shutting down")
        key = prompt.vision[0].content_hash if prompt.vision else None
        rid = request_id or f"req-{next(_ids)}"
        skip: set[str] = set()
        while True:
            name = self._pick(key, skip)
            if self._running[name] >= self.max_queue:
                raise EngineFull(f"replica {name} has {self._running[name]} requests in flight "
                                 f"(limit {self.max_queue})")
            _note("generate", name)
            self._running[name] += 1
            self._owner[rid] = name
            stream = self._handles[name].options(stream=True).generate.remote(prompt, params, rid)
            started = finished = False
            try:
                async for out in stream:
                    started, finished = True, out.finished
                    yield out
                    if finished:
                        return
                return
            except (GeneratorExit, asyncio.CancelledError):
                raise
            except Exception as e:  # noqa: BLE001
                if not started and self._retry_elsewhere(name, e, skip):
                    continue
                self._failed[name] += 1
                raise _unwrap(e) from None
            finally:
                self._running[name] -= 1
                self._owner.pop(rid, None)
                if finished:
                    self._served[name] += 1
                else:                              # the caller left early: stop the replica's work too
                    stream.cancel()

    def _pick(self, key: str | None, skip: set[str]) -> str:
        names = [n for n in self.names if n not in skip] or self.names
        return pick_replica(names, key, self._running, self.spill, self._up)

    def _retry_elsewhere(self, name: str, exc: BaseException, skip: set[str]) -> bool:
        """True when `exc` says the replica itself is gone (not that the request was bad) and another is left."""
        from ray import exceptions

        gone = tuple(getattr(exceptions, n) for n in ("RayActorError", "ActorUnavailableError") if hasattr(exceptions, n))
        if not isinstance(exc, gone):
            return False
        log.warning("replica %s is gone (%s); marking it down", name, type(exc).__name__)
        self._up[name] = False
        skip.add(name)
        return len(skip) < len(self.names)

    def abort(self, request_id: str) -> None:
        name = self._owner.get(request_id)
        if name is not None:
            self._handles[name].abort.remote(request_id)

    # The rest of AsyncEngine's contract: each replica's engine runs in its own Ray actor, whose own process
    # compiles grammars and fails its requests on shutdown; the front holds nothing of that to report or end.
    def stalled_for(self) -> float:
        return 0.0

    def fail_all(self, reason: str = "the server is shutting down") -> int:
        return 0

    def compiles_running(self) -> int:
        return 0

    def stop_workers(self) -> None:
        pass

    def stats(self) -> dict:
        """Totals over the replicas, plus `replicas`: {name: that replica's engine stats and front counters}."""
        per, total = {}, {}
        for n in self.names:
            s = dict(self._replica_stats.get(n) or {})
            s.update(requests_running=self._running[n], requests_served=self._served[n],
                     requests_failed=self._failed[n], up=int(self._up[n]))
            per[n] = s
            for k, v in s.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("up", "pid"):
                    total[k] = total.get(k, 0) + v
        total["num_active"] = self.num_active
        total["replicas"] = per
        return total

    async def shutdown(self, grace_s: float = 30.0) -> None:
        """Refuse new requests and wait up to `grace_s` for running ones; the replicas are Ray's to stop."""
        self._stopping = True
        deadline = time.monotonic() + grace_s
        while self.num_active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._stop_poll.set()

    def _poll(self) -> None:
        """Fetch every replica's engine stats once per `poll_s`; a replica that does not answer is down."""
        while not self._stop_poll.is_set():
            for n in self.names:
                try:
                    self._replica_stats[n] = self._handles[n].stats.remote().result(timeout_s=max(2.0, self._poll_s))
                    if not self._up[n]:
                        log.info("replica %s is up again", n)
                    self._up[n] = True
                except Exception as e:  # noqa: BLE001 - dead, restarting or overloaded: route around it
                    if self._up[n]:
                        log.warning("replica %s does not answer (%s); routing around it", n, type(e).__name__)
                    self._up[n] = False
            self._stop_poll.wait(self._poll_s)


class ReplicaHeader:
    """Pure ASGI middleware: `X-Qwenvl-Replica` on every HTTP response (see the module docstring)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        holder: dict = {}
        token = _served_by.set(holder)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                names = holder.get("generate") or holder.get("prepare") or ["none"]
                value = ",".join(dict.fromkeys(names)).encode("latin-1")
                message = {**message, "headers": [*message.get("headers", []), (HEADER, value)]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_header)
        finally:
            _served_by.reset(token)
