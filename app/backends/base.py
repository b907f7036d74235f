"""The Backend protocol: how predictions travel from the model stage to the API replicas."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol, runtime_checkable


@runtime_checkable
class Backend(Protocol):
    """Publish/subscribe on named channels, plus the sequence numbers of the message stream.

    ``seq`` and ``epoch`` live in the backend so that every API replica numbers messages the
    same way and a subscriber can resume on any of them.
    """

    url: str

    async def connect(self) -> None:
        """Open connections; idempotent."""
        ...

    async def disconnect(self) -> None:
        """Close connections; idempotent."""
        ...

    async def publish(self, channel: str, payload: bytes) -> None:
        """Deliver ``payload`` to every current subscriber of ``channel``, in publish order."""
        ...

    def subscribe(self, channel: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Receive every payload published on ``channel`` from now on."""
        ...

    async def reserve_seq(self, count: int) -> int:
        """Reserve ``count`` consecutive sequence numbers; return the first."""
        ...

    async def epoch(self) -> str:
        """The identity of the current numbering; it changes when numbering restarts."""
        ...

    async def ping(self) -> bool:
        """True when the backend can take work now."""
        ...
