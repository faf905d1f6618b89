"""AsyncEngine hands a step's outputs to the event loop in one thread-safe call (qwenvl/engine/async_engine.py)."""

import asyncio

from qwenvl.engine.async_engine import AsyncEngine


def test_a_steps_outputs_reach_their_streams_in_order_with_one_call_into_the_loop():
    loop = asyncio.new_event_loop()
    try:
        engine = object.__new__(AsyncEngine)           # only the delivery: no model, no engine thread
        streams = {rid: asyncio.Queue() for rid in ("a", "b", "c")}
        engine._streams = {rid: (loop, q) for rid, q in streams.items()}
        calls = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args: (calls.append(args), real(*args))[1]
        engine._deliver_all([("a", 1), ("b", 2), ("gone", 9), ("a", 3), ("c", 4)])   # "gone": its client left
        loop.run_until_complete(asyncio.sleep(0))
        assert len(calls) == 1
        got = {rid: [q.get_nowait() for _ in range(q.qsize())] for rid, q in streams.items()}
        assert got == {"a": [1, 3], "b": [2], "c": [4]}
        engine._deliver("b", 5)                        # a single item (an error) takes the same path
        loop.run_until_complete(asyncio.sleep(0))
        assert streams["b"].get_nowait() == 5 and len(calls) == 2
    finally:
        loop.close()
