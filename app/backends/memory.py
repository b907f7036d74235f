"""The embedded backend: in-process channels and counters. Nothing to install or run."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from app.backends.base import Numbered


class _Subscription:
    """A subscriber's backlog of payloads, bounded in messages."""

    def __init__(self) -> None:
        self.payloads: deque[tuple[int, bytes, int]] = deque()
        self.messages = 0
        self.ready = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()


class MemoryBackend:
    """Channels fan payloads out to their subscriptions, each bounded in messages.

    The subscriber is the service's own hub, which only moves payloads into bounded
    per-client queues; when it falls ``max_pending_messages`` behind, ``publish`` waits for it,
    so the shard queues fill and POST answers 503 instead of memory growing.
    """

    OPTIONS = ("max_pending_messages",)

    def __init__(self, url: str = "memory://", *, max_pending_messages: int = 50_000) -> None:
        self.url = url
        self.max_pending_messages = max_pending_messages
        self._channels: dict[str, set[_Subscription]] = {}
        self._next_seq = 1
        # Sortable and unique: a restart always changes the epoch.
        self._epoch = f"{int(time.time()):x}-{secrets.token_hex(4)}"

    async def connect(self) -> None:
        return None

    async def disconnect(self) -> None:
        for subs in self._channels.values():
            for sub in subs:
                sub.room.set()  # release a publisher waiting for a subscriber that is gone
        self._channels.clear()

    def pending(self, channel: str) -> int:
        """Messages published and not yet taken by the slowest subscription."""
        return max((s.messages for s in self._channels.get(channel, ())), default=0)

    async def publish(self, channel: str, payload: bytes, count: int) -> int:
        for sub in list(self._channels.get(channel, ())):
            while sub.messages and sub.messages + count > self.max_pending_messages:
                sub.room.clear()
                await sub.room.wait()
        first = self._next_seq
        self._next_seq += count
        for sub in self._channels.get(channel, ()):
            sub.payloads.append((first, payload, count))
            sub.messages += count
            sub.ready.set()
        return first

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[Numbered]]:
        sub = _Subscription()
        self._channels.setdefault(channel, set()).add(sub)

        async def payloads() -> AsyncIterator[Numbered]:
            while True:
                while not sub.payloads:
                    sub.ready.clear()
                    await sub.ready.wait()
                first, payload, count = sub.payloads.popleft()
                sub.messages -= count
                sub.room.set()
                yield first, payload

        try:
            yield payloads()
        finally:
            self._channels.get(channel, set()).discard(sub)
            sub.room.set()

    async def recent(self, channel: str, max_messages: int) -> list[Numbered]:
        return []

    async def epoch(self) -> str:
        return self._epoch

    async def ping(self) -> bool:
        return True
