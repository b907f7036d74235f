"""The embedded model stage, wired: ingest -> batcher -> shard runner -> publish."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import BrokenExecutor
from typing import Any

from app.backends.base import Backend
from app.config import Settings
from app.pipeline import shard
from app.pipeline.batcher import Batcher, BatchObserver
from app.pipeline.ingest import Ingestor, RecentIds, SensorRegistry, ShardQueue, sweep_idle
from app.pipeline.publish import Publisher
from app.pipeline.routing import shard_of
from app.pipeline.runner import ShardRunner
from app.schemas import Reading

log = logging.getLogger(__name__)


def make_runners(settings: Settings) -> list[ShardRunner]:
    """One runner per model process, as the settings say (both topologies use this)."""
    spec = settings.process_spec()
    return [
        ShardRunner(
            index,
            spec,
            checkpoint_every_readings=settings.checkpoint_max_readings,
            checkpoint_interval_s=settings.checkpoint_interval_s,
        )
        for index in range(settings.workers)
    ]


class Pipeline:
    """Owns the shard queues, the batchers and the shard runners.

    ``offer`` admits readings; everything admitted is predicted and published, including
    during a graceful ``stop``, which refuses new readings first and then drains.
    """

    def __init__(self, settings: Settings, backend: Backend) -> None:
        self.settings = settings
        self.runners = make_runners(settings)
        self.queues = [ShardQueue(settings.queue_max_readings) for _ in range(settings.workers)]
        self.registry = SensorRegistry(settings.max_sensors)
        self.ingestor = Ingestor(
            self.queues,
            RecentIds(settings.dedup_window_s, settings.dedup_max_ids),
            self.registry,
        )
        self.on_evict: Callable[[list[str]], object] | None = None
        """Told the ids of evicted sensors, to forget them elsewhere (the hub)."""
        self.evicted = 0
        self._sweeper: asyncio.Task[None] | None = None
        self.publisher = Publisher(backend)
        self.batchers = [
            Batcher(
                queue,
                runner,
                self.publisher,
                max_size=settings.batch_max_size,
                window_ms=settings.batch_window_ms,
                in_flight=settings.batches_in_flight,
            )
            for queue, runner in zip(self.queues, self.runners, strict=True)
        ]
        self.observer: BatchObserver | None = None
        self.started = False

    @property
    def stage(self) -> Pipeline:
        return self

    @property
    def ready(self) -> bool:
        return self.started and all(r.healthy for r in self.runners) and self.ingestor.open

    @property
    def published(self) -> int:
        return self.publisher.published

    @property
    def last_seq(self) -> int:
        return self.publisher.last_seq

    async def offer(
        self, readings: list[Reading], deadline: float | None = None
    ) -> tuple[int, int]:
        """Admit a request whole, waiting for room until ``deadline`` (the event loop's
        clock; None: at once); see :meth:`Ingestor.admit`."""
        if deadline is None:
            return self.ingestor.offer(readings)
        return await self.ingestor.admit(readings, deadline)

    async def checks(self) -> dict[str, bool]:
        return {"pool": all(r.healthy for r in self.runners), "accepting": self.ingestor.open}

    def describe(self) -> dict[str, Any]:
        return {
            "role": "embedded",
            "shard_pids": [r.pid for r in self.runners],
            "shards_healthy": [r.healthy for r in self.runners],
            "rebuilds": sum(r.rebuilds for r in self.runners),
        }

    def pending(self) -> int:
        return sum(q.pending for q in self.queues)

    def queue_figures(self) -> list[tuple[str, int, int, int]]:
        return [(str(i), q.pending, q.waiting, q.capacity) for i, q in enumerate(self.queues)]

    def admission_waits(self) -> tuple[int, float]:
        """Times a request waited for room in the queues, and the seconds spent (for the
        metrics)."""
        return self.ingestor.waits, self.ingestor.waited_s

    def dedup_size(self) -> int:
        """(sensor_id, id) pairs remembered to acknowledge retries (for the metrics)."""
        return len(self.ingestor.recent)

    async def start(self) -> None:
        if self.started:
            return
        await asyncio.wait_for(
            asyncio.gather(*(r.start() for r in self.runners)),
            self.settings.pool_start_timeout_s,
        )
        log.info("model processes ready: %s", [r.pid for r in self.runners])
        await self._load_models()
        for batcher in self.batchers:
            batcher.observer = self.observer
            batcher.start()
        if self.settings.sensor_idle_evict_s > 0:
            self._sweeper = asyncio.create_task(
                sweep_idle(self.settings.sensor_idle_evict_s, self.evict_idle),
                name="sensor-sweeper",
            )
        self.started = True

    async def stop(self) -> None:
        """Refuse new readings, drain the accepted ones (bounded by the shutdown timeout)."""
        if not self.started:
            return
        self.ingestor.open = False
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        drains = [b.drain() for b in self.batchers]
        try:
            await asyncio.wait_for(asyncio.gather(*drains), self.settings.shutdown_timeout_s)
        except TimeoutError:
            log.error("shutdown timeout: %d readings were not predicted", self.pending())
            await asyncio.gather(*(b.cancel() for b in self.batchers))
        await self._save_models()
        await asyncio.gather(*(r.stop() for r in self.runners))
        self.started = False

    async def __aenter__(self) -> Pipeline:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _load_models(self) -> None:
        """Hand each shard the saved models of the sensors it owns (before readiness)."""
        model_dir = self.settings.model_dir
        if model_dir is None:
            return
        names = await asyncio.to_thread(_saved_models, str(model_dir))
        by_shard: dict[int, list[str]] = defaultdict(list)
        for sensor_id, path in names:
            by_shard[shard_of(sensor_id, len(self.runners))].append(path)
        counts = await asyncio.gather(
            *(self.runners[i].call(shard.load_states, paths) for i, paths in by_shard.items())
        )
        if names:
            log.info("loaded %d of %d saved models from %s", sum(counts), len(names), model_dir)

    async def _save_models(self) -> None:
        if self.settings.model_dir is None:
            return
        runners = [r for r in self.runners if r.healthy]
        counts = await asyncio.gather(
            *(r.call(shard.save_states) for r in runners), return_exceptions=True
        )
        for runner, count in zip(runners, counts, strict=True):
            if isinstance(count, BaseException):
                log.error("shard %d: saving the models failed: %r", runner.shard, count)
        saved = sum(c for c in counts if isinstance(c, int))
        log.info("saved %d models to %s", saved, self.settings.model_dir)

    async def evict_idle(self, horizon: float) -> int:
        """Forget the sensors without a reading since ``horizon`` (epoch seconds): here, in
        the hub (``on_evict``) and in their workers, which save each model to the model
        dir first when one is set. Returns how many sensors were evicted.

        Taken from the registry in one synchronous step, so a reading admitted after it is
        queued behind the eviction on its shard and finds (or resumes) its model afresh.
        """
        gone = self.registry.idle(horizon)
        if not gone:
            return 0
        by_shard: dict[int, list[str]] = defaultdict(list)
        for sid in gone:
            by_shard[shard_of(sid, len(self.runners))].append(sid)
        futures = [
            self.runners[index].call(shard.evict_sensors, ids, mutates=True)
            for index, ids in by_shard.items()
        ]
        if self.on_evict is not None:
            self.on_evict(gone)
        self.evicted += len(gone)
        results = await asyncio.gather(*futures, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, BrokenExecutor):
                log.error("evicting sensors in a worker failed: %r", result)
        log.info("evicted %d sensors idle since %s", len(gone), time.ctime(horizon))
        return len(gone)


def _saved_models(model_dir: str) -> list[tuple[str, str]]:
    """``(sensor_id, path)`` of every model saved in ``model_dir`` (created if missing)."""
    os.makedirs(model_dir, exist_ok=True)
    return [
        (name.removesuffix(shard.MODEL_SUFFIX), os.path.join(model_dir, name))
        for name in sorted(os.listdir(model_dir))
        if name.endswith(shard.MODEL_SUFFIX)
    ]
