"""Turns: at most one CPU-heavy step per iteration of the event loop.

An event loop runs every callback that is ready when an iteration starts before it looks at
its timers and sockets again. Six requests that each parse 1,000 readings, a prediction batch
to dispatch and a frame to build for a subscriber, all ready at once, hold the loop for the sum
of their steps (30-50 ms at saturation), and every other request waits that long, however
little the loop has to do on average. A step that runs under a turn instead runs alone among
the heavy ones: the next holder starts an iteration later, so timers, health checks and socket
reads get in between, and the longest wait is about one heavy step.

Turns are taken in arrival order and only around synchronous work: a holder never awaits
anything else while it holds one.

Examples:
    >>> async def demo():
    ...     order = []
    ...     async def step(name):
    ...         async with turn():
    ...             order.append(name)
    ...     await asyncio.gather(step("a"), step("b"), step("c"))
    ...     return order
    >>> asyncio.run(demo())
    ['a', 'b', 'c']
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque


class Turns:
    """The turns of one event loop; see the module's docstring."""

    __slots__ = ("_held", "_waiting", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._held = False
        self._waiting: deque[asyncio.Future[None]] = deque()

    async def __aenter__(self) -> None:
        if not self._held:
            self._held = True
            return
        waiter = self._loop.create_future()
        self._waiting.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._pass()  # handed the turn as it was cancelled: pass it on
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        # The next holder starts in the next iteration, after timers and sockets.
        self._loop.call_soon(self._pass)

    def _pass(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._held = False


_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Turns] = weakref.WeakKeyDictionary()


def turn() -> Turns:
    """The running loop's turns: ``async with turn(): <synchronous heavy step>``."""
    loop = asyncio.get_running_loop()
    turns = _turns.get(loop)
    if turns is None:
        turns = _turns[loop] = Turns(loop)
    return turns
