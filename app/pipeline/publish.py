"""Publish each batch's messages on the backend, in the order batches are handed in.

A model process already packed the batch's message bodies (see ``app/pipeline/wire.py``); the
backend numbers the batch atomically with appending it (``seq`` of its first message), so
``seq`` rises in the order every API replica sees. Nothing here looks at a message.
"""

from __future__ import annotations

from app.backends.base import Backend
from app.pipeline.wire import CHANNEL


class Publisher:
    """Publishes each batch's payload; ``publish`` waits while the backend has no room."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.published = 0
        self.last_seq = 0
        """The highest seq published so far."""

    async def publish(self, payload: bytes, count: int) -> int:
        """Publish a packed batch of ``count`` messages; returns ``count``."""
        if not count:
            return 0
        first = await self.backend.publish(CHANNEL, payload, count)
        self.published += count
        self.last_seq = first + count - 1
        return count
