"""The Backend protocol: how predictions travel from the model stage to the API replicas."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol, runtime_checkable

Numbered = tuple[int, bytes]
"""A published payload and the ``seq`` of its first message."""


@runtime_checkable
class Backend(Protocol):
    """A numbered log of payloads per channel, with live subscriptions.

    ``publish`` numbers the messages of a payload atomically with appending it, so ``seq``
    rises strictly in the order every subscriber sees, whichever process published. ``epoch``
    names the numbering; it changes when the numbering restarts (a fresh memory backend, a
    Redis that lost its data).
    """

    url: str

    async def connect(self) -> None:
        """Open connections; idempotent."""
        ...

    async def disconnect(self) -> None:
        """Close connections; idempotent."""
        ...

    async def publish(self, channel: str, payload: bytes, count: int) -> int:
        """Append ``payload``, holding ``count`` messages, to ``channel``; return its first seq."""
        ...

    def subscribe(self, channel: str) -> AbstractAsyncContextManager[AsyncIterator[Numbered]]:
        """Receive every payload published on ``channel`` from now on, in order.

        An item ``(0, b"EPOCH FROM_SEQ")`` (no payload is numbered 0) says that the numbering
        changed to ``EPOCH`` (a Redis replica was promoted, or Redis lost its data) and that
        the payloads that follow are numbered from ``FROM_SEQ`` in it."""
        ...

    async def recent(self, channel: str, max_messages: int) -> list[Numbered]:
        """Payloads already published, oldest first, holding about ``max_messages`` at most
        (empty where the backend keeps no log: the subscriber's own history covers it)."""
        ...

    async def epoch(self) -> str:
        """The identity of the current numbering."""
        ...

    async def ping(self) -> bool:
        """True when the backend can take work now."""
        ...
