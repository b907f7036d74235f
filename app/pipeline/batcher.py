"""Drain a shard's queue into batches by size or deadline, run them, publish in order.

One task per shard does it all, which keeps order and recovery simple. It takes waiting
readings (giving stragglers ``batch_window_ms`` to join a batch that is not full), queues
the batch on the shard's worker, and keeps up to ``batches_in_flight`` batches queued there so
the worker never waits for this process between two batches. Results are published in the
order the batches were queued, so per-sensor order holds end to end.

Nothing accepted is lost when a worker process dies. Every few seconds the task asks the
worker for a checkpoint of its models (queued like a batch, so it reflects exactly the batches
before it) and keeps the batches completed since then. When the worker dies, the shard is
rebuilt, given the checkpoint, replayed the batches since (models take the readings in; no
prediction is published twice), and the batches that were in flight run again in order. A
batch that kills its worker again is split in halves until the reading responsible is
alone; that reading gets ``status: "error"`` and the others are predicted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import BrokenExecutor
from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec

from app.pipeline.inference import (
    BatchResult,
    Prediction,
    PredictionBody,
    ShardPool,
    TrainingJob,
    export_states,
    import_states,
    run_batch,
)
from app.pipeline.ingest import ShardQueue
from app.pipeline.publish import Publisher
from app.schemas import Reading

log = logging.getLogger(__name__)

States = dict[str, tuple[tuple[str, ...], Any]]
WORKER_DIED = "the worker process died on this reading"


def error_predictions(readings: list[Reading], reason: str) -> list[Prediction]:
    """Predictions with ``status: "error"`` for readings the model stage could not score.

    Examples:
        >>> from app.schemas import Reading
        >>> [p] = error_predictions([Reading("a", "1", 0.0, ("value",), (1.0,), 0.0)], "boom")
        >>> b'"status":"error"' in p.body and b'"reason":"boom"' in p.body
        True
    """
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


class _Batch(NamedTuple):
    readings: list[Reading]
    installs: list[tuple[str, Any]]
    future: asyncio.Future[Any]
    checkpoint: bool = False
    """A checkpoint request rather than a batch: ``future`` yields the worker's states."""
    submitted: float = 0.0
    """``time.perf_counter()`` when queued on the worker."""


BatchObserver = Callable[[list[Reading], BatchResult, float | None], None]
"""Called once per published batch with its readings, result and pool time (None when it
ran during a recovery); see ``app.metrics.Metrics.observe_batch``."""


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
        checkpoint_interval_s: float = 5.0,
        checkpoint_max_readings: int = 200_000,
    ) -> None:
        self.shard = shard
        self.queue = queue
        self.pool = pool
        self.publisher = publisher
        self.max_size = max_size
        self.window_s = window_ms / 1000
        self.in_flight = in_flight
        self.on_job = on_job
        self.checkpoint_interval_s = checkpoint_interval_s
        self.checkpoint_max_readings = checkpoint_max_readings
        self.installs: list[tuple[str, Any]] = []
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._pending: deque[_Batch] = deque()
        # Recovery state: the last checkpoint and the batches completed since.
        self._checkpoint: States = {}
        self._since_checkpoint: list[tuple[list[Reading], list[tuple[str, Any]]]] = []
        self._since_checkpoint_readings = 0
        self._checkpoint_asked = False
        self._last_checkpoint = time.monotonic()
        self.batches = 0
        self.recoveries = 0
        self.poisoned = 0
        self.observer: BatchObserver | None = None
        self._worker_free_at = 0.0

    def install(self, sensor_id: str, fitted: Any) -> None:
        """Send a refitted model to the worker with the next batch (an empty one if idle)."""
        self.installs.append((sensor_id, fitted))
        self.queue.ready.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"batcher-{self.shard}")

    async def drain(self) -> None:
        """Finish every reading already queued, then stop."""
        self._closing = True
        self.queue.ready.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # -- the loop -----------------------------------------------------------------------------

    async def _run(self) -> None:
        queue = self.queue
        pending = self._pending
        while True:
            if not pending:
                while not queue.waiting and not self.installs:
                    if self._closing:
                        return
                    queue.ready.clear()
                    await queue.ready.wait()
                if queue.waiting < self.max_size and self.window_s > 0 and not self._closing:
                    await asyncio.sleep(self.window_s)
            while len(pending) < self.in_flight and (queue.waiting or self.installs):
                self._submit(queue.take(self.max_size))
            self._maybe_checkpoint()
            head = pending[0].future
            if len(pending) < self.in_flight and not queue.waiting:
                # Wake for the head's result or for new readings, whichever comes first.
                queue.ready.clear()
                more = asyncio.ensure_future(queue.ready.wait())
                await asyncio.wait((head, more), return_when=asyncio.FIRST_COMPLETED)
                more.cancel()
            else:
                await asyncio.wait((head,))
            if head.done():
                await self._complete(pending.popleft())

    def _submit(self, readings: list[Reading]) -> None:
        installs, self.installs = self.installs, []
        future = self.pool.submit(self.shard, run_batch, readings, installs)
        self._pending.append(_Batch(readings, installs, future, False, time.perf_counter()))
        self.batches += 1

    def _maybe_checkpoint(self) -> None:
        if self._checkpoint_asked:
            return
        due = (
            self._since_checkpoint_readings >= self.checkpoint_max_readings
            or time.monotonic() - self._last_checkpoint >= self.checkpoint_interval_s
        )
        if due and self._since_checkpoint:
            self._checkpoint_asked = True
            future = self.pool.submit(self.shard, export_states)
            self._pending.append(_Batch([], [], future, True, time.perf_counter()))

    async def _complete(self, batch: _Batch) -> None:
        # A shard's worker runs its calls one after another, so a call's own time starts
        # when it was queued or when the previous call finished, whichever is later.
        done_at = time.perf_counter()
        task_s = done_at - max(batch.submitted, self._worker_free_at)
        self._worker_free_at = done_at
        try:
            outcome = batch.future.result()
        except BrokenExecutor:
            await self._recover(batch)
            return
        except Exception as exc:
            # Not a dead worker: something in the batch itself (say, it could not be
            # pickled). Its readings get error predictions; the shard carries on.
            log.exception("shard %d: batch of %d readings failed", self.shard, len(batch.readings))
            outcome = BatchResult(
                error_predictions(batch.readings, f"model stage failed: {type(exc).__name__}"),
                [],
                [],
            )
        if batch.checkpoint:
            self._took_checkpoint(outcome)
            return
        self._since_checkpoint.append((batch.readings, batch.installs))
        self._since_checkpoint_readings += len(batch.readings)
        await self._publish(batch.readings, outcome, task_s)

    def _took_checkpoint(self, states: States) -> None:
        self._checkpoint = states
        self._since_checkpoint = []
        self._since_checkpoint_readings = 0
        self._checkpoint_asked = False
        self._last_checkpoint = time.monotonic()

    async def _publish(
        self, readings: list[Reading], result: BatchResult, task_s: float | None = None
    ) -> None:
        try:
            await self.publisher.publish(result.predictions, result.swaps)
        finally:
            self.queue.done(len(readings))
        if self.observer is not None:
            self.observer(readings, result, task_s)
        for job in result.jobs:
            self.on_job(job._replace(shard=self.shard))

    # -- recovery ------------------------------------------------------------------------------

    async def _recover(self, failed: _Batch) -> None:
        """The worker died: rebuild it, restore its models, rerun what was in flight."""
        started = time.perf_counter()
        self.recoveries += 1
        in_flight = [failed, *self._pending]
        self._pending.clear()
        # Every later future fails too (the process is gone); let them settle.
        await asyncio.gather(*(b.future for b in in_flight), return_exceptions=True)
        log.warning(
            "shard %d: worker died with %d batches (%d readings) in flight; recovering",
            self.shard,
            sum(not b.checkpoint for b in in_flight),
            sum(len(b.readings) for b in in_flight),
        )
        await self._restore()
        for batch in in_flight:
            if batch.checkpoint:
                self._checkpoint_asked = False
                continue
            result = await self._run_isolating(batch.readings, batch.installs)
            await self._publish(batch.readings, result)
        log.warning("shard %d: recovered in %.2f s", self.shard, time.perf_counter() - started)

    async def _restore(self) -> None:
        """A fresh worker with the last checkpoint and every batch completed since."""
        while True:
            await self.pool.rebuild(self.shard)
            try:
                if self._checkpoint:
                    await self.pool.submit(self.shard, import_states, self._checkpoint)
                for readings, installs in self._since_checkpoint:
                    await self.pool.submit(self.shard, run_batch, readings, installs, True)
                return
            except BrokenExecutor:
                # The replay killed it (a model that dies on its own state): start over
                # from the checkpoint rather than lose the shard.
                log.error("shard %d: worker died while restoring; retrying", self.shard)

    async def _run_isolating(
        self, readings: list[Reading], installs: list[tuple[str, Any]]
    ) -> BatchResult:
        """Run a batch on a fresh worker; if it dies again, split to find the reading.

        Whatever the worker completes is added to the replay log here, so a later restore
        replays exactly what the worker had seen.
        """
        try:
            result: BatchResult = await self.pool.submit(self.shard, run_batch, readings, installs)
        except BrokenExecutor:
            await self._restore()
        else:
            self._since_checkpoint.append((readings, installs))
            self._since_checkpoint_readings += len(readings)
            return result
        if len(readings) <= 1:
            self.poisoned += len(readings)
            log.error(
                "shard %d: a reading of sensor %s killed its worker twice; it gets an error",
                self.shard,
                readings[0].sensor_id if readings else "?",
            )
            return BatchResult(error_predictions(readings, WORKER_DIED), [], [])
        half = len(readings) // 2
        first = await self._run_isolating(readings[:half], installs)
        second = await self._run_isolating(readings[half:], [])
        return BatchResult(
            first.predictions + second.predictions,
            first.swaps + second.swaps,
            first.jobs + second.jobs,
        )
