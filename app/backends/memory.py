"""The embedded backend: in-process channels and counters. Nothing to install or run."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from app.backends.base import Numbered


class MemoryBackend:
    """Channels are sets of unbounded asyncio queues, one per subscription.

    Unbounded is deliberate: the subscriber is the service's own relay task, which only
    moves payloads into bounded per-client queues, so it never falls far behind.
    """

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._channels: dict[str, set[asyncio.Queue[Numbered]]] = {}
        self._next_seq = 1
        # Sortable and unique: a restart always changes the epoch.
        self._epoch = f"{int(time.time()):x}-{secrets.token_hex(4)}"

    async def connect(self) -> None:
        return None

    async def disconnect(self) -> None:
        self._channels.clear()

    async def publish(self, channel: str, payload: bytes, count: int) -> int:
        first = self._next_seq
        self._next_seq += count
        for queue in self._channels.get(channel, ()):
            queue.put_nowait((first, payload))
        return first

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[Numbered]]:
        queue: asyncio.Queue[Numbered] = asyncio.Queue()
        self._channels.setdefault(channel, set()).add(queue)

        async def payloads() -> AsyncIterator[Numbered]:
            while True:
                yield await queue.get()

        try:
            yield payloads()
        finally:
            self._channels.get(channel, set()).discard(queue)

    async def recent(self, channel: str, max_messages: int) -> list[Numbered]:
        return []

    async def epoch(self) -> str:
        return self._epoch

    async def ping(self) -> bool:
        return True
