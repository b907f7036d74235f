"""Drain a shard's queue into batches by size or deadline, run them, publish in order.

Each shard has two tasks. The collector waits for readings, gives stragglers
``batch_window_ms`` to join, and queues the batch on the shard's worker; up to
``batches_in_flight`` batches may be queued there at once, so the worker never waits for the
service process between two batches. The deliverer awaits the batches in the order they were
queued and publishes their predictions, so per-sensor order holds end to end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from app.pipeline.inference import (
    BatchResult,
    Prediction,
    PredictionBody,
    ShardPool,
    TrainingJob,
)
from app.pipeline.ingest import ShardQueue
from app.pipeline.publish import Publisher
from app.schemas import Reading

log = logging.getLogger(__name__)


def error_predictions(readings: list[Reading], reason: str) -> list[Prediction]:
    """Predictions with ``status: "error"`` for readings the model stage could not score.

    Examples:
        >>> from app.schemas import Reading
        >>> [p] = error_predictions([Reading("a", "1", 0.0, ("value",), (1.0,), 0.0)], "boom")
        >>> b'"status":"error"' in p.body and b'"reason":"boom"' in p.body
        True
    """
    import msgspec

    now = datetime.now(UTC)
    encoder = msgspec.json.Encoder()
    out = []
    for r in readings:
        body = PredictionBody(
            r.sensor_id, r.id, datetime.fromtimestamp(r.ts, UTC),
            dict(zip(r.channels, r.values, strict=True)), None, None, False, "error", 0,
            datetime.fromtimestamp(r.ingested_at, UTC), now, reason,
        )  # fmt: skip
        out.append(Prediction(r.sensor_id, False, encoder.encode(body)))
    return out


class Batcher:
    """The batching loop of one shard."""

    def __init__(
        self,
        shard: int,
        queue: ShardQueue,
        pool: ShardPool,
        publisher: Publisher,
        *,
        max_size: int,
        window_ms: float,
        in_flight: int,
        on_job: Callable[[TrainingJob], None],
    ) -> None:
        self.shard = shard
        self.queue = queue
        self.pool = pool
        self.publisher = publisher
        self.max_size = max_size
        self.window_s = window_ms / 1000
        self.on_job = on_job
        self.installs: list[tuple[str, Any]] = []
        self._in_flight: asyncio.Queue[tuple[list[Reading], asyncio.Future[BatchResult]] | None] = (
            asyncio.Queue(maxsize=in_flight)
        )
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self.batches = 0

    def install(self, sensor_id: str, fitted: Any) -> None:
        """Send a refitted model to the worker with the next batch (an empty one if idle)."""
        self.installs.append((sensor_id, fitted))
        self.queue.ready.set()

    def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._collect(), name=f"collect-{self.shard}"),
                asyncio.create_task(self._deliver(), name=f"deliver-{self.shard}"),
            ]

    async def drain(self) -> None:
        """Finish every reading already queued, then stop."""
        self._closing = True
        self.queue.ready.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _collect(self) -> None:
        queue = self.queue
        try:
            while True:
                while not queue.waiting and not self.installs:
                    if self._closing:
                        return
                    queue.ready.clear()
                    await queue.ready.wait()
                if queue.waiting < self.max_size and self.window_s > 0 and not self._closing:
                    await asyncio.sleep(self.window_s)
                readings = queue.take(self.max_size)
                installs, self.installs = self.installs, []
                future = self.pool.run_batch(self.shard, readings, installs)
                self.batches += 1
                await self._in_flight.put((readings, future))
        finally:
            await self._in_flight.put(None)

    async def _deliver(self) -> None:
        while True:
            item = await self._in_flight.get()
            if item is None:
                return
            readings, future = item
            try:
                result = await future
            except Exception as exc:
                log.exception("shard %d: batch of %d readings failed", self.shard, len(readings))
                reason = f"model stage failed: {type(exc).__name__}"
                result = BatchResult(error_predictions(readings, reason), [], [])
            try:
                await self.publisher.publish(result.predictions, result.swaps)
            finally:
                self.queue.done(len(readings))
            for job in result.jobs:
                self.on_job(job._replace(shard=self.shard))
