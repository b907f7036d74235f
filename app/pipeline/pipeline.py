"""The whole model stage of one service process, wired: ingest -> batcher -> pool -> publish."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from app.backends.base import Backend
from app.config import Settings
from app.pipeline.batcher import Batcher
from app.pipeline.inference import MODEL_SUFFIX, ShardPool, TrainingJob
from app.pipeline.ingest import Ingestor, RecentIds, ShardQueue
from app.pipeline.publish import Publisher
from app.schemas import Reading

log = logging.getLogger(__name__)


class Pipeline:
    """Owns the shard queues, the batchers, the process pool and the trainer tasks.

    ``offer`` admits readings; everything admitted is predicted and published, including
    during a graceful ``stop``, which refuses new readings first and then drains.
    """

    def __init__(self, settings: Settings, backend: Backend) -> None:
        self.settings = settings
        self.pool = ShardPool(
            settings.workers,
            settings.trainer_workers,
            settings.model,
            settings.pool_start_timeout_s,
            settings.executor,
            settings.model_options(),
            str(settings.model_dir) if settings.model_dir is not None else None,
        )
        self.queues = [ShardQueue(settings.queue_max_readings) for _ in range(settings.workers)]
        self.ingestor = Ingestor(
            self.queues, RecentIds(settings.dedup_window_s, settings.dedup_max_ids)
        )
        self.publisher = Publisher(backend)
        self.batchers = [
            Batcher(
                shard,
                queue,
                self.pool,
                self.publisher,
                max_size=settings.batch_max_size,
                window_ms=settings.batch_window_ms,
                in_flight=settings.batches_in_flight,
                on_job=self._train,
                checkpoint_interval_s=settings.checkpoint_interval_s,
                checkpoint_max_readings=settings.checkpoint_max_readings,
            )
            for shard, queue in enumerate(self.queues)
        ]
        self.started = False
        self.on_fits: Callable[[list[float], int], None] | None = None
        """Told of each finished refit: ``([duration_s], 0)``, or ``([], 1)`` for a failure."""

    @property
    def ready(self) -> bool:
        return self.started and self.pool.ready and self.ingestor.open

    async def offer(self, readings: list[Reading]) -> tuple[int, int]:
        """Admit a request whole; see :meth:`Ingestor.offer`."""
        return self.ingestor.offer(readings)

    async def checks(self) -> dict[str, bool]:
        return {"pool": self.pool.ready, "accepting": self.ingestor.open}

    def describe(self) -> dict[str, Any]:
        pool = self.pool
        return {
            "role": "embedded",
            "shard_pids": pool.pids,
            "shards_healthy": pool.healthy,
            "trainer_pids": pool.trainer_pids,
            "rebuilds": pool.rebuilds,
        }

    def pending(self) -> int:
        return sum(q.pending for q in self.queues)

    async def start(self) -> None:
        if self.started:
            return
        await self.pool.start()
        await self._load_models()
        for batcher in self.batchers:
            batcher.start()
        self.started = True

    async def stop(self) -> None:
        """Refuse new readings, drain the accepted ones (bounded by the shutdown timeout)."""
        if not self.started:
            return
        self.ingestor.open = False
        drains = [b.drain() for b in self.batchers]
        try:
            await asyncio.wait_for(asyncio.gather(*drains), self.settings.shutdown_timeout_s)
        except TimeoutError:
            log.error("shutdown timeout: %d readings were not predicted", self.pending())
            await asyncio.gather(*(b.cancel() for b in self.batchers))
        await self.pool.cancel_training()
        await self._save_models()
        await self.pool.stop()
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
            by_shard[self.ingestor.shard_of(sensor_id)].append(path)
        counts = await asyncio.gather(
            *(self.pool.load_states(shard, paths) for shard, paths in by_shard.items())
        )
        if names:
            log.info("loaded %d of %d saved models from %s", sum(counts), len(names), model_dir)

    async def _save_models(self) -> None:
        if self.settings.model_dir is None:
            return
        shards = [shard for shard in range(self.pool.size) if self.pool.healthy[shard]]
        counts = await asyncio.gather(
            *(self.pool.save_states(shard) for shard in shards), return_exceptions=True
        )
        for shard, count in zip(shards, counts, strict=True):
            if isinstance(count, BaseException):
                log.error("shard %d: saving the models failed: %r", shard, count)
        saved = sum(c for c in counts if isinstance(c, int))
        log.info("saved %d models to %s", saved, self.settings.model_dir)

    def _train(self, job: TrainingJob) -> None:
        batcher = self.batchers[job.shard]
        started = time.perf_counter()

        def deliver(fitted: Any) -> None:
            if self.on_fits is not None:
                if fitted is None:
                    self.on_fits([], 1)
                else:
                    self.on_fits([time.perf_counter() - started], 0)
            batcher.install(job.sensor_id, fitted)

        self.pool.train(job, deliver)


def _saved_models(model_dir: str) -> list[tuple[str, str]]:
    """``(sensor_id, path)`` of every model saved in ``model_dir`` (created if missing)."""
    os.makedirs(model_dir, exist_ok=True)
    return [
        (name.removesuffix(MODEL_SUFFIX), os.path.join(model_dir, name))
        for name in sorted(os.listdir(model_dir))
        if name.endswith(MODEL_SUFFIX)
    ]
