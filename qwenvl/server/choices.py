"""`n` choices for one prompt: n engine requests, each with its own seed stream, answered as one response.

The choices share the prompt's token ids and vision inputs, so the engine's prefix and encoder caches
serve the later ones. With n == 1 this is exactly one request under the response's own id.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from fastapi import Request

from . import generation as gen


def choice_id(response_id: str, index: int, n: int) -> str:
    return response_id if n == 1 else f"{response_id}-{index}"


class Choices:
    """The started requests of one response; start() queues them all or none."""

    def __init__(self, state, response_id: str, n: int):
        self.state, self.response_id, self.n = state, response_id, n
        self.started: list[tuple] = []        # (first output, iterator over the rest) per choice

    def id(self, index: int) -> str:
        return choice_id(self.response_id, index, self.n)

    async def start(self, prompt, params, request: Request) -> None:
        # Only choice 0 watches the client: one reader of the connection's receive channel.
        results = await asyncio.gather(
            *(gen.start(self.state, prompt, p, self.id(i), request if i == 0 else None)
              for i, p in enumerate(params.for_choices(self.n))), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            for i, r in enumerate(results):
                if not isinstance(r, BaseException):
                    await gen.close_quietly(r[1])
                    self.state.engine.abort(self.id(i))
            raise failed[0]
        self.started = results

    async def run_to_end(self, request: Request, route: str, t0: float) -> list:
        """Every choice's final output, in index order; a client that leaves aborts them all."""
        async def collect_all():
            return await asyncio.gather(*(gen.collect(self.state, first, agen, self.id(i), route, t0)
                                          for i, (first, agen) in enumerate(self.started)))
        return await gen.until_disconnect(request, collect_all())

    async def stream(self, route: str, t0: float) -> AsyncIterator[tuple[int, object]]:
        """(index, output) as each choice produces them; closing this aborts the unfinished choices."""
        if self.n == 1:
            first, agen = self.started[0]
            async for out in gen.outputs(self.state, first, agen, self.id(0), route, t0):
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, first, agen):
            try:
                async for out in gen.outputs(self.state, first, agen, self.id(i), route, t0):
                    await queue.put((i, out))
            except Exception as e:  # noqa: BLE001 - handed to the reader, which reports it in-band
                await queue.put((i, e))

        tasks = [asyncio.create_task(pump(i, f, a)) for i, (f, a) in enumerate(self.started)]
        left = self.n
        try:
            while left:
                i, out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                yield i, out
                left -= out.finished
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def usage_totals(outs: list) -> tuple[int, int]:
    """(prompt tokens, completion tokens) of a response: the prompt once, every choice's completion."""
    return outs[0].prompt_tokens, sum(len(o.token_ids) for o in outs)
