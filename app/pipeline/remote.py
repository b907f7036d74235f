"""The API role when scaled out on Redis: readings go to Redis Streams, workers do the rest."""

from __future__ import annotations

from typing import Any

from app.backends.redis import RedisBackend, RedisUnavailable
from app.config import Settings
from app.pipeline.ingest import Overloaded
from app.schemas import Reading


class RemoteIngest:
    """Admits readings into the partition streams; ``202`` only once Redis has them.

    It stands where the embedded :class:`~app.pipeline.pipeline.Pipeline` stands in the API:
    same ``offer``, same readiness checks, no process pool of its own.
    """

    def __init__(self, settings: Settings, backend: RedisBackend) -> None:
        self.settings = settings
        self.backend = backend
        self.open = True
        self.started = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.open = False

    async def offer(self, readings: list[Reading]) -> tuple[int, int]:
        """Append a request's readings to Redis, whole or not at all.

        Raises:
            Overloaded: shutting down, a partition is full, or Redis did not answer in time.
        """
        if not self.open:
            raise Overloaded(retry_after_s=5)
        try:
            outcome = await self.backend.offer(
                readings,
                partitions=self.settings.partitions,
                capacity=self.settings.queue_max_readings,
                dedup_ttl_s=self.settings.dedup_window_s,
            )
        except RedisUnavailable:
            raise Overloaded(retry_after_s=2, reason="the backend is unavailable") from None
        if outcome is None:
            raise Overloaded(retry_after_s=1)
        return outcome

    async def checks(self) -> dict[str, bool]:
        workers = await self.backend.live_workers(self.settings.lease_ttl_s)
        return {"accepting": self.open, "workers": workers > 0}

    def describe(self) -> dict[str, Any]:
        return {"role": "api", "partitions": self.settings.partitions}
