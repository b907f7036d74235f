"""The API role when scaled out on Redis: readings go to Redis Streams, workers do the rest."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from app.backends.redis import NotReplicated, RedisBackend, RedisUnavailable
from app.config import Settings
from app.pipeline.batcher import BatchObserver
from app.pipeline.ingest import Overloaded, SensorRegistry, sweep_idle
from app.pipeline.routing import split_by_shard
from app.schemas import Reading, TooLarge


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
        self.observer: BatchObserver | None = None
        self.on_evict: Callable[[list[str]], object] | None = None
        self.stage = None
        self.last_seq = 0
        self.registry = SensorRegistry(settings.max_sensors)
        """Sensors this replica admitted readings of: it bounds them alone (each replica
        and the workers keep their own state)."""
        self.workers_live = 0
        self._sweeper: asyncio.Task[None] | None = None
        """Workers heartbeating within the lease at the last :meth:`checks`."""

    async def start(self) -> None:
        if self.settings.sensor_idle_evict_s > 0:
            self._sweeper = asyncio.create_task(
                sweep_idle(self.settings.sensor_idle_evict_s, self.evict_idle),
                name="sensor-sweeper",
            )
        self.started = True

    async def stop(self) -> None:
        self.open = False
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def evict_idle(self, horizon: float) -> int:
        """Forget the sensors without a reading here since ``horizon`` (epoch seconds): in
        the registry and the hub (``on_evict``). The workers evict their models on their own
        clock (see ``app/worker.py``)."""
        gone = self.registry.idle(horizon)
        if gone and self.on_evict is not None:
            self.on_evict(gone)
        return len(gone)

    async def offer(
        self, readings: list[Reading], deadline: float | None = None
    ) -> tuple[int, int]:
        """Append a request's readings to Redis, whole or not at all, at once (``deadline``
        is the embedded pipeline's: a full partition is refused without waiting).

        Raises:
            TooLarge: one partition's share is larger than its whole queue (413).
            Overloaded: shutting down, a partition is full, or Redis did not answer in time.
            SensorLimitReached: new sensors beyond ``max_sensors`` (507).
        """
        if not self.open:
            raise Overloaded(retry_after_s=5)
        ids = [r.sensor_id for r in readings]
        self.registry.check(ids)
        if len(readings) > self.settings.queue_max_readings:
            largest = max(map(len, split_by_shard(readings, self.settings.partitions)))
            if largest > self.settings.queue_max_readings:
                raise TooLarge(
                    f"{largest} readings for one partition; its whole queue holds "
                    f"{self.settings.queue_max_readings}: split the request"
                )
        try:
            outcome = await self.backend.offer(
                readings,
                partitions=self.settings.partitions,
                capacity=self.settings.queue_max_readings,
                dedup_ttl_s=self.settings.dedup_window_s,
            )
        except NotReplicated:
            # Written on the primary, maybe not kept by a failover: a retry is safe for
            # readings with an id (acknowledged as duplicates once the first attempt holds).
            raise Overloaded(
                retry_after_s=1, reason="too few Redis replicas acknowledged the readings"
            ) from None
        except RedisUnavailable:
            raise Overloaded(retry_after_s=2, reason="the backend is unavailable") from None
        if outcome is None:
            raise Overloaded(retry_after_s=1)
        self.registry.touch(ids, time.time())
        return outcome

    async def checks(self) -> dict[str, bool]:
        workers = self.workers_live = await self.backend.live_workers(self.settings.lease_ttl_s)
        return {"accepting": self.open, "workers": workers > 0}

    def describe(self) -> dict[str, Any]:
        return {"role": "api", "partitions": self.settings.partitions}
