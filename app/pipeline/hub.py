"""The prediction hub: history, per-sensor summaries and fan-out to WebSocket subscribers.

The hub reads the backend's ``predictions`` channel (so every API replica sees every message),
keeps a bounded history indexed by ``seq`` for resumes, and pushes each message into the
bounded queue of every subscriber whose filter matches. It never awaits a subscriber: a
slow client only ever fills its own queue, and the configured policy decides what it loses.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from app.backends.base import Backend
from app.config import SlowClientPolicy
from app.pipeline.publish import CHANNEL, Message, decode_batch

log = logging.getLogger(__name__)

RECENT_PER_SENSOR = 20


class SensorFilter:
    """Which messages a subscriber wants: sensor ids or globs, and anomalies only.

    Examples:
        >>> f = SensorFilter(["pump-*", "fan-1"])
        >>> [f.wants_sensor(s) for s in ("pump-7", "fan-1", "fan-2")]
        [True, True, False]
        >>> SensorFilter([]).wants_sensor("anything")
        True
    """

    def __init__(self, sensors: Iterable[str] = (), anomalies_only: bool = False) -> None:
        self.sensors = sorted(set(sensors))
        self.anomalies_only = anomalies_only
        self.everything = not self.sensors
        ids = {s for s in self.sensors if not any(c in s for c in "*?[")}
        globs = [s for s in self.sensors if s not in ids]
        self._ids = ids
        self._glob = re.compile("|".join(fnmatch.translate(g) for g in globs)) if globs else None
        self._cache: dict[str, bool] = {}

    def wants_sensor(self, sensor_id: str) -> bool:
        if self.everything:
            return True
        hit = self._cache.get(sensor_id)
        if hit is None:
            if len(self._cache) > 100_000:
                self._cache.clear()
            hit = sensor_id in self._ids or bool(self._glob and self._glob.match(sensor_id))
            self._cache[sensor_id] = hit
        return hit

    def wants(self, message: Message) -> bool:
        if self.anomalies_only and message.kind == "prediction" and not message.is_anomaly:
            return False
        return self.wants_sensor(message.sensor_id)


class Subscriber:
    """One WebSocket client's bounded queue of frames."""

    def __init__(self, filter: SensorFilter, max_frames: int, policy: SlowClientPolicy) -> None:
        self.filter = filter
        self.max_frames = max_frames
        self.policy = policy
        self.queue: deque[Message] = deque()
        self.dropped = 0
        """Messages dropped since the last ``lagged`` notice."""
        self.dropped_total = 0
        """Messages dropped over the subscriber's life (for metrics)."""
        self.overflowed = False
        """With the ``disconnect`` policy: the queue overflowed and the client must go."""
        self.wake = asyncio.Event()

    def push(self, message: Message) -> None:
        queue = self.queue
        if len(queue) >= self.max_frames:
            if self.policy is SlowClientPolicy.disconnect:
                self.overflowed = True
                self.wake.set()
                return
            if self.policy is SlowClientPolicy.latest_per_sensor:
                self._conflate(message)
                return
            queue.popleft()
            self.dropped += 1
            self.dropped_total += 1
        queue.append(message)
        self.wake.set()

    def push_many(self, messages: list[Message]) -> None:
        if len(self.queue) + len(messages) <= self.max_frames:
            self.queue.extend(messages)
            if messages:
                self.wake.set()
            return
        for message in messages:
            self.push(message)

    def _conflate(self, message: Message) -> None:
        # Keep, per sensor, only its newest message; order by seq is preserved.
        latest: dict[tuple[str, str], Message] = {}
        for queued in self.queue:
            latest[(queued.kind, queued.sensor_id)] = queued
        latest[(message.kind, message.sensor_id)] = message
        kept = sorted(latest.values(), key=lambda m: m.seq)
        lost = len(self.queue) + 1 - len(kept)
        self.dropped += lost
        self.dropped_total += lost
        self.queue = deque(kept[-self.max_frames :])
        self.wake.set()

    def take(self) -> list[Message]:
        taken = list(self.queue)
        self.queue.clear()
        self.wake.clear()
        return taken


@dataclass
class SensorSummary:
    sensor_id: str
    count: int = 0
    anomalies: int = 0
    model_version: int = 0
    last: str | None = None
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=RECENT_PER_SENSOR))
    last_seen: float = 0.0


class PredictionHub:
    """Receives published messages and fans them out."""

    def __init__(
        self,
        backend: Backend,
        *,
        history_max_frames: int,
        history_max_age_s: float,
        subscriber_queue_frames: int,
        policy: SlowClientPolicy,
    ) -> None:
        self.backend = backend
        self.history: deque[tuple[float, Message]] = deque()
        self.history_max_frames = history_max_frames
        self.history_max_age_s = history_max_age_s
        self.subscriber_queue_frames = subscriber_queue_frames
        self.policy = policy
        self.subscribers: set[Subscriber] = set()
        self.sensors: dict[str, SensorSummary] = {}
        self.latest_seq = 0
        self.epoch = ""
        self.slow_disconnects = 0
        """Subscribers that left after overflowing (policy ``disconnect``)."""
        self._dropped_gone = 0
        self.closing = False
        """Set at shutdown: relays flush their queues and close with 1001."""
        self._task: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self._changed = asyncio.Event()

    async def start(self) -> None:
        if self._task is None:
            self.epoch = await self.backend.epoch()
            self._task = asyncio.create_task(self._listen(), name="hub-listen")
            await self._listening.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def close_subscribers(self, timeout_s: float) -> None:
        """Let every subscriber flush what it has queued, then close it with 1001."""
        self.closing = True
        for sub in self.subscribers:
            sub.wake.set()
        await self._wait_until(lambda: not self.subscribers, timeout_s)

    async def settle(self, seq: int, timeout_s: float) -> bool:
        """Wait until the message numbered ``seq`` has been dispatched here."""
        return await self._wait_until(lambda: self.latest_seq >= seq, timeout_s)

    async def _wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while not predicate():
                    self._changed.clear()
                    await self._changed.wait()
        return predicate()

    async def __aenter__(self) -> PredictionHub:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _listen(self) -> None:
        async with self.backend.subscribe(CHANNEL) as payloads:
            # What the backend kept (Redis) fills the history, so resumes work on a replica
            # that has just started.
            for first, payload in await self.backend.recent(CHANNEL, self.history_max_frames):
                self.dispatch(decode_batch(first, payload, self.epoch))
            self._listening.set()
            async for first, payload in payloads:
                try:
                    self.dispatch(decode_batch(first, payload, self.epoch))
                except Exception:
                    log.exception("dropping a malformed message batch")

    def dispatch(self, messages: list[Message]) -> None:
        """Record a batch and push it to every matching subscriber (never awaits)."""
        if not messages:
            return
        now = time.monotonic()
        history = self.history
        sensors = self.sensors
        for message in messages:
            history.append((now, message))
            summary = sensors.get(message.sensor_id)
            if summary is None:
                summary = sensors[message.sensor_id] = SensorSummary(message.sensor_id)
            summary.last_seen = now
            if message.kind == "prediction":
                summary.count += 1
                summary.last = message.frame
                summary.recent.append(message.frame)
                if message.is_anomaly:
                    summary.anomalies += 1
        self._trim(now)
        self.latest_seq = max(self.latest_seq, messages[-1].seq)
        self._changed.set()
        for sub in self.subscribers:
            f = sub.filter
            if f.everything and not f.anomalies_only:
                sub.push_many(messages)
            else:
                sub.push_many([m for m in messages if f.wants(m)])

    def _trim(self, now: float) -> None:
        history = self.history
        while len(history) > self.history_max_frames:
            history.popleft()
        horizon = now - self.history_max_age_s
        while history and history[0][0] < horizon:
            history.popleft()

    def subscribe(
        self, filter: SensorFilter, since: int | None = None
    ) -> tuple[Subscriber, list[Message], int | None]:
        """Register a subscriber; return it, the kept messages after ``since``, and the first
        seq lost (or None) when ``since`` reaches back beyond the history.

        Registration and the replay are taken in one step, so the live stream continues
        exactly where the replay ends: no duplicates and no holes.
        """
        sub = Subscriber(filter, self.subscriber_queue_frames, self.policy)
        self.subscribers.add(sub)
        if since is None:
            return sub, [], None
        replay = [m for _, m in self.history if m.seq > since and filter.wants(m)]
        oldest = self.history[0][1].seq if self.history else self.latest_seq + 1
        gap_from = since + 1 if since + 1 < oldest and since < self.latest_seq else None
        return sub, replay, gap_from

    def unsubscribe(self, sub: Subscriber) -> None:
        if sub in self.subscribers:
            self.subscribers.discard(sub)
            self._dropped_gone += sub.dropped_total
            self.slow_disconnects += sub.overflowed
        self._changed.set()

    @property
    def frames_dropped(self) -> int:
        """Messages dropped for slow subscribers, over the hub's life."""
        return self._dropped_gone + sum(s.dropped_total for s in self.subscribers)

    def snapshot(self, filter: SensorFilter) -> list[str]:
        """The latest prediction of every sensor the filter wants, ordered by sensor id."""
        return [
            s.last
            for sid, s in sorted(self.sensors.items())
            if s.last is not None and filter.wants_sensor(sid)
        ]

    def sensor_list(self) -> list[dict[str, Any]]:
        return [self._describe(s, recent=False) for _, s in sorted(self.sensors.items())]

    def sensor(self, sensor_id: str) -> dict[str, Any] | None:
        summary = self.sensors.get(sensor_id)
        return None if summary is None else self._describe(summary, recent=True)

    def _describe(self, s: SensorSummary, *, recent: bool) -> dict[str, Any]:
        import json

        last = json.loads(s.last) if s.last else None
        out: dict[str, Any] = {
            "sensor_id": s.sensor_id,
            "count": s.count,
            "anomalies": s.anomalies,
            "model_version": last["model_version"] if last else 0,
            "last_reading": (
                {"ts": last["ts"], "values": last["values"], "id": last.get("id")} if last else None
            ),
            "last_prediction": last,
        }
        if recent:
            out["recent_predictions"] = [json.loads(f) for f in s.recent]
        return out
