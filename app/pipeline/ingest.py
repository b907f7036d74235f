"""Admission: request bodies in memory, deduplication of retried readings, and the bounded
per-shard queues.

Every stage between the socket and the process pool is bounded, and a full stage refuses the
request (503 with ``Retry-After``) rather than growing: the bytes of bodies being received
and parsed (:class:`BodyBudget`), then the readings waiting or in flight per shard
(:class:`ShardQueue`). A request is admitted whole or not at all. Everything here is
synchronous and runs between two awaits, so a request's check-then-enqueue cannot interleave
with another's.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from app.pipeline.routing import shard_of
from app.schemas import Reading, TooLarge


class Overloaded(Exception):
    """The pipeline cannot take the whole request now (503)."""

    def __init__(self, retry_after_s: int, reason: str = "the pipeline is full") -> None:
        super().__init__(f"{reason}; retry later")
        self.retry_after_s = retry_after_s


class BodyBudget:
    """Bytes of request bodies held in memory at once, while received and parsed.

    Without it, many concurrent large uploads would each hold a body (and its parsed
    readings) before the queues could refuse them.

    Examples:
        >>> budget = BodyBudget(max_bytes=100)
        >>> budget.take(60), budget.take(60), budget.used
        (True, False, 60)
        >>> budget.give_back(60); budget.take(100)
        True
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes; False (and nothing reserved) when they do not fit."""
        if self.used + size > self.max_bytes:
            return False
        self.used += size
        return True

    def give_back(self, size: int) -> None:
        self.used -= size


class RecentIds:
    """(sensor_id, id) pairs accepted within the last ``window_s`` seconds, at most ``max_ids``.

    Only each pair's 64-bit hash is kept, which halves the memory of a full window of client
    ids; a new reading is taken for a duplicate only on a hash collision, with odds of about
    5e-14 against a million remembered ids.

    Examples:
        >>> ids = RecentIds(window_s=60, max_ids=2)
        >>> ids.add(("a", "1"), now=0.0); ids.add(("a", "2"), now=1.0)
        >>> ("a", "1") in ids
        True
        >>> ids.add(("a", "3"), now=2.0)  # over max_ids: the oldest is forgotten
        >>> ("a", "1") in ids
        False
    """

    def __init__(self, window_s: float, max_ids: int) -> None:
        self.window_s = window_s
        self.max_ids = max_ids
        self._seen: dict[int, float] = {}

    def __contains__(self, key: tuple[str, str]) -> bool:
        return hash(key) in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, key: tuple[str, str], now: float) -> None:
        if self.max_ids == 0:
            return
        self._seen[hash(key)] = now
        self.expire(now)

    def expire(self, now: float) -> None:
        # dict keeps insertion order, so the oldest entries come first.
        seen = self._seen
        horizon = now - self.window_s
        while seen:
            key = next(iter(seen))
            if len(seen) <= self.max_ids and seen[key] >= horizon:
                break
            del seen[key]


class ShardQueue:
    """Readings accepted for one shard and not yet published.

    ``capacity`` bounds readings waiting *and* in flight in the worker: a reading leaves the
    count only once its prediction is published, so a slow model stage fills the queue and
    POST answers 503 instead of memory growing.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.pending = 0
        """Readings admitted and not yet published."""
        self._waiting: deque[list[Reading]] = deque()
        self._waiting_count = 0
        self.ready = asyncio.Event()

    def free(self) -> int:
        return self.capacity - self.pending

    def put(self, readings: list[Reading]) -> None:
        self._waiting.append(readings)
        self._waiting_count += len(readings)
        self.pending += len(readings)
        self.ready.set()

    @property
    def waiting(self) -> int:
        return self._waiting_count

    def take(self, limit: int) -> list[Reading]:
        """Up to ``limit`` waiting readings, oldest first."""
        batch: list[Reading] = []
        while self._waiting and len(batch) < limit:
            chunk = self._waiting.popleft()
            room = limit - len(batch)
            if len(chunk) > room:
                self._waiting.appendleft(chunk[room:])
                chunk = chunk[:room]
            batch.extend(chunk)
        self._waiting_count -= len(batch)
        if not self._waiting:
            self.ready.clear()
        return batch

    def done(self, count: int) -> None:
        self.pending -= count


class Ingestor:
    """Routes readings to shards by sensor and admits requests whole."""

    def __init__(self, queues: list[ShardQueue], recent: RecentIds) -> None:
        self.queues = queues
        self.recent = recent
        self.open = True

    def offer(self, readings: list[Reading]) -> tuple[int, int]:
        """Admit a request's readings; return (accepted, duplicates).

        Raises:
            Overloaded: the service is shutting down or a shard has no room for its share;
                nothing of the request was taken.
            TooLarge: a shard's share is larger than its whole queue, so no retry could
                succeed; nothing of the request was taken.
        """
        if not self.open:
            raise Overloaded(retry_after_s=5, reason="the service is shutting down")
        now = time.time()
        recent = self.recent
        recent.expire(now)
        fresh: list[Reading] = []
        keys: set[tuple[str, str]] = set()
        for r in readings:
            if r.id is not None:
                key = (r.sensor_id, r.id)
                if key in recent or key in keys:
                    continue
                keys.add(key)
            fresh.append(r)
        per_shard: list[list[Reading]] = [[] for _ in self.queues]
        if len(self.queues) == 1:
            per_shard[0] = fresh
        else:
            n = len(self.queues)
            for r in fresh:
                per_shard[shard_of(r.sensor_id, n)].append(r)
        for queue, share in zip(self.queues, per_shard, strict=True):
            if len(share) > queue.free():
                if len(share) > queue.capacity:
                    raise TooLarge(
                        f"{len(share)} new readings for one shard, whose queue holds at most "
                        f"{queue.capacity}; send smaller requests"
                    )
                raise Overloaded(retry_after_s=1)
        for queue, share in zip(self.queues, per_shard, strict=True):
            if share:
                queue.put(share)
        for key in keys:
            recent.add(key, now)
        return len(fresh), len(readings) - len(fresh)
