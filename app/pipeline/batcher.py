"""The embedded driver of a shard: queue -> runner -> publisher.

One task per shard drains the shard's queue into batches by size or deadline (giving
stragglers ``batch_window_ms`` to join a batch that is not full), of whole request shares
packed at admission (``wire.Packed``: a batch is their joined bytes); hands them to the
shard's :class:`~app.pipeline.runner.ShardRunner` with up to ``batches_in_flight`` queued
there so the model process never waits for this one between two batches, and publishes each
outcome in the order the batches were taken, so per-sensor order holds end to end. What
happens between a batch and its predictions (checkpoints, a dead process, a poison reading)
is the runner's.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from app.pipeline import wire
from app.pipeline.ingest import ShardQueue
from app.pipeline.publish import Publisher
from app.pipeline.runner import Done, ShardRunner

log = logging.getLogger(__name__)

BatchObserver = Callable[[wire.Packed, Done], None]
"""Called once per published batch with its readings and what the runner returned; see
``app.metrics.Metrics.observe_batch``."""


class Batcher:
    """The batching loop of one shard."""

    def __init__(
        self,
        queue: ShardQueue,
        runner: ShardRunner,
        publisher: Publisher,
        *,
        max_size: int,
        window_ms: float,
        in_flight: int,
    ) -> None:
        self.queue = queue
        self.runner = runner
        self.publisher = publisher
        self.max_size = max_size
        self.window_s = window_ms / 1000
        self.in_flight = in_flight
        self.observer: BatchObserver | None = None
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"batcher-{self.runner.shard}")

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

    async def _run(self) -> None:
        queue = self.queue
        pending: deque[tuple[wire.Packed, asyncio.Future[Done]]] = deque()
        while True:
            if not pending:
                while not queue.waiting:
                    if self._closing:
                        return
                    queue.ready.clear()
                    await queue.ready.wait()
                if queue.waiting < self.max_size and self.window_s > 0 and not self._closing:
                    await asyncio.sleep(self.window_s)
            while len(pending) < self.in_flight and queue.waiting:
                batch = queue.take(self.max_size)
                pending.append((batch, self.runner.submit(batch)))
            head = pending[0][1]
            if len(pending) < self.in_flight and not queue.waiting:
                # Wake for the head's outcome or for new readings, whichever comes first.
                queue.ready.clear()
                more = asyncio.ensure_future(queue.ready.wait())
                await asyncio.wait((head, more), return_when=asyncio.FIRST_COMPLETED)
                more.cancel()
            else:
                await asyncio.wait((head,))
            if head.done():
                batch, future = pending.popleft()
                done = future.result()
                try:
                    await self.publisher.publish(done.outcome.payload, done.outcome.messages)
                finally:
                    queue.done(batch.size)
                if self.observer is not None:
                    self.observer(batch, done)
