"""Admission: request bodies in memory, deduplication of retried readings, and the bounded
per-shard queues.

Every stage between the socket and the process pool is bounded, and a full stage refuses the
request (503 with ``Retry-After``) rather than growing: the bytes of bodies being received
and parsed (:class:`BodyBudget`), then the readings waiting or in flight per shard
(:class:`ShardQueue`, where a request first waits a bounded time for room). A request is
admitted whole or not at all: its check-then-enqueue runs between two awaits, so it cannot
interleave with another's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from app.pipeline import wire
from app.pipeline.routing import split_by_shard
from app.schemas import Reading, TooLarge

log = logging.getLogger(__name__)

T = TypeVar("T")


class Overloaded(Exception):
    """The pipeline cannot take the whole request now (503)."""

    def __init__(self, retry_after_s: int, reason: str = "the pipeline is full") -> None:
        super().__init__(f"{reason}; retry later")
        self.retry_after_s = retry_after_s


class BodyBudget:
    """Bytes of request bodies held in memory at once, while received and parsed.

    Without it, many concurrent large uploads would each hold a body (and its parsed
    readings) before the queues could refuse them. A quarter of it is kept for bodies of at
    most ``large_body_bytes`` (unless that leaves less than ``max_body_bytes`` for the
    others): clients that stall large bodies can fill the rest, never that share, so ordinary
    requests are still served while the stalled ones wait out their deadline.

    Examples:
        >>> budget = BodyBudget(max_bytes=100, large_body_bytes=10, max_body_bytes=50)
        >>> budget.take(60, 60), budget.take(20, 80), budget.take(20, 5), budget.used
        (True, False, True, 80)
        >>> budget.give_back(80); budget.take(100, 5)
        True
    """

    def __init__(self, max_bytes: int, large_body_bytes: int, max_body_bytes: int = 0) -> None:
        self.max_bytes = max_bytes
        self.large_body_bytes = large_body_bytes
        # A body of the largest size allowed must always fit alone.
        self.large_max_bytes = max(max_bytes - max_bytes // 4, max_body_bytes)
        self.used = 0

    def fits(self, size: int, body_size: int) -> bool:
        """Whether ``size`` more bytes fit, for a body that is then ``body_size`` long."""
        limit = self.max_bytes if body_size <= self.large_body_bytes else self.large_max_bytes
        return self.used + size <= limit

    def take(self, size: int, body_size: int) -> bool:
        """Reserve ``size`` bytes of a body then ``body_size`` long; False (and nothing
        reserved) when they do not fit."""
        if not self.fits(size, body_size):
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


class SensorLimitReached(Exception):
    """New sensors beyond ``max_sensors`` (507); nothing of the request was taken."""


class SensorRegistry:
    """The sensors the service keeps state for, with when each last sent a reading.

    Bounds per-sensor state: a request bringing new sensors beyond ``max_sensors`` is
    refused whole, and :meth:`idle` names the sensors to forget.

    Examples:
        >>> reg = SensorRegistry(max_sensors=2)
        >>> reg.admit(["a", "b", "a"], now=0.0)
        >>> try:
        ...     reg.admit(["c"], now=1.0)
        ... except SensorLimitReached as e:
        ...     print(str(e)[:69])
        the request brings 1 new sensors and 2 are known: over the limit of 2
        >>> reg.admit(["b"], now=5.0); reg.idle(horizon=2.0), len(reg)
        (['a'], 1)
    """

    def __init__(self, max_sensors: int) -> None:
        self.max_sensors = max_sensors
        self.last_seen: dict[str, float] = {}
        self.refused = 0

    def __len__(self) -> int:
        return len(self.last_seen)

    def check(self, sensor_ids: list[str]) -> None:
        """Raises:
        SensorLimitReached: the new ids among ``sensor_ids`` do not fit."""
        seen = self.last_seen
        if len(seen) + len(sensor_ids) <= self.max_sensors:
            return
        new = {sid for sid in sensor_ids if sid not in seen}
        if len(seen) + len(new) > self.max_sensors:
            self.refused += 1
            raise SensorLimitReached(
                f"the request brings {len(new)} new sensors and {len(seen)} are known: over "
                f"the limit of {self.max_sensors} sensors (SENSORCAST_MAX_SENSORS); nothing "
                "of the request was accepted"
            )

    def touch(self, sensor_ids: Iterable[str], now: float) -> None:
        self.last_seen.update(dict.fromkeys(sensor_ids, now))

    def admit(self, sensor_ids: list[str], now: float) -> None:
        self.check(sensor_ids)
        self.touch(sensor_ids, now)

    def idle(self, horizon: float) -> list[str]:
        """Forget the sensors without a reading since ``horizon``; returns their ids."""
        seen = self.last_seen
        gone = [sid for sid, at in seen.items() if at < horizon]
        for sid in gone:
            del seen[sid]
        return gone


def sweep_period(idle_s: float) -> float:
    """How often idle sensors are looked for: a quarter of ``idle_s``, at most a minute."""
    return min(60.0, max(0.05, idle_s / 4))


async def sweep_idle(idle_s: float, evict_idle: Callable[[float], Awaitable[object]]) -> None:
    """Call ``evict_idle(horizon)`` every :func:`sweep_period`, with the epoch time before
    which a sensor's last reading makes it idle; runs until cancelled."""
    while True:
        await asyncio.sleep(sweep_period(idle_s))
        try:
            await evict_idle(time.time() - idle_s)
        except Exception:
            log.exception("evicting idle sensors failed; trying again later")


class ShardQueue:
    """Readings accepted for one shard and not yet published, packed by request share.

    ``capacity`` bounds readings waiting *and* in flight in the worker: a reading leaves the
    count only once its prediction is published, so a slow model stage fills the queue and
    POST answers 503 (after a bounded wait for room, where one is allowed) instead of memory
    growing.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.pending = 0
        """Readings admitted and not yet published."""
        self._waiting: deque[wire.Packed] = deque()
        self._waiting_count = 0
        self.ready = asyncio.Event()
        self.freed: asyncio.Event | None = None
        """Set whenever readings leave the count: the event an :class:`Ingestor` shares
        between its queues, for the requests waiting for room."""

    def free(self) -> int:
        return self.capacity - self.pending

    def put(self, share: wire.Packed) -> None:
        self._waiting.append(share)
        self._waiting_count += share.size
        self.pending += share.size
        self.ready.set()

    @property
    def waiting(self) -> int:
        return self._waiting_count

    def take(self, limit: int) -> wire.Packed:
        """The oldest waiting readings, whole request shares, as many as fit ``limit`` (a
        share larger than it goes alone), as one packed batch. Only while some wait.

        Examples:
            >>> from app.schemas import Reading
            >>> queue = ShardQueue(100)
            >>> for n in (3, 4, 5):
            ...     queue.put(wire.pack([Reading("a", None, 0.0, ("v",), (0.0,), 0.0)] * n))
            >>> queue.take(8).size, queue.take(2).size, queue.waiting, queue.pending
            (7, 5, 0, 12)
        """
        waiting = self._waiting
        parts = [waiting.popleft()]
        count = parts[0].size
        while waiting and count + waiting[0].size <= limit:
            part = waiting.popleft()
            parts.append(part)
            count += part.size
        self._waiting_count -= count
        if not waiting:
            self.ready.clear()
        return wire.join(parts)

    def done(self, count: int) -> None:
        self.pending -= count
        if self.freed is not None:
            self.freed.set()


class Ingestor:
    """Routes readings to shards by sensor and admits requests whole.

    With :meth:`admit`, a request that finds no room waits for it, behind the requests that
    waited before it, until a deadline (``admission_wait_ms``); only then is it refused.
    Clients honour the ``Retry-After`` of a 503 in whole seconds: where a queue drains faster
    than that, a refused client's seconds are seconds the model processes may run dry, while
    a waiting request takes room the moment a batch is published.
    """

    def __init__(
        self,
        queues: list[ShardQueue],
        recent: RecentIds,
        registry: SensorRegistry | None = None,
    ) -> None:
        self.queues = queues
        self.recent = recent
        self.registry = registry if registry is not None else SensorRegistry(1 << 62)
        self._open = True
        self._freed = asyncio.Event()
        for queue in queues:
            queue.freed = self._freed
        self._turn = asyncio.Lock()
        """Held by the request first in line for room (asyncio wakes a lock's waiters in the
        order they came)."""
        self.waits = 0
        """Times a request waited for room (for the metrics)."""
        self.waited_s = 0.0
        """Seconds requests spent waiting for room, together."""

    @property
    def open(self) -> bool:
        return self._open

    @open.setter
    def open(self, value: bool) -> None:
        self._open = value
        if not value:
            self._freed.set()  # the requests waiting for room are refused now

    def free(self) -> int:
        """Room left in all the queues together."""
        return sum(queue.free() for queue in self.queues)

    def has_room(self, count: int) -> bool:
        """Whether about ``count`` readings fit the queues' room together now, with no
        request waiting for room before them."""
        return not self._turn.locked() and count <= self.free()

    async def room_for(self, count: int, deadline: float) -> bool:
        """Whether about ``count`` readings fit the queues' room together, waiting behind
        the requests already waiting until ``deadline`` (the event loop's clock).

        Checked before a body is parsed, so a request waits as its bytes, not as thousands
        of readings; :meth:`admit` then checks each shard's share exactly.
        """
        if self.has_room(count):
            return True

        def fits() -> bool | None:
            # Shutting down: let the request on, to be refused by the offer as such.
            return True if not self._open or count <= self.free() else None

        return bool(await self._in_turn(fits, deadline))

    async def admit(self, readings: list[Reading], deadline: float) -> tuple[int, int]:
        """:meth:`offer`, waiting until ``deadline`` (the event loop's clock) while a shard has
        no room for its share, behind the requests already waiting.

        Raises:
            Overloaded: shutting down, or still no room at the deadline.
            TooLarge, SensorLimitReached: as :meth:`offer`.
        """
        if not self._turn.locked():
            done = self._try(readings)
            if done is not None:
                return done
        done = await self._in_turn(lambda: self._try(readings), deadline)
        if done is None:
            raise Overloaded(retry_after_s=1)
        return done

    async def _in_turn(self, attempt: Callable[[], T | None], deadline: float) -> T | None:
        """``attempt()`` until it gives a result, in turn, each time readings leave a queue;
        None at ``deadline``.

        The one first in line returns with no await between its successful attempt and its
        caller's next step, so the room it found is still there (a body parsed at once,
        below ``HEAVY_BODY_BYTES``, is offered before anyone else runs).
        """
        clock = asyncio.get_running_loop().time
        started = clock()
        if started >= deadline:
            return None
        self.waits += 1
        try:
            async with asyncio.timeout_at(deadline), self._turn:
                while True:
                    self._freed.clear()
                    done = attempt()
                    if done is not None:
                        return done
                    await self._freed.wait()
        except TimeoutError:
            return None
        finally:
            self.waited_s += clock() - started

    def offer(self, readings: list[Reading]) -> tuple[int, int]:
        """Admit a request's readings at once; return (accepted, duplicates).

        Raises:
            Overloaded: the service is shutting down or a shard has no room for its share;
                nothing of the request was taken.
            TooLarge: a shard's share is larger than its whole queue, so no retry could
                succeed; nothing of the request was taken.
            SensorLimitReached: the request brings new sensors beyond ``max_sensors``;
                nothing of it was taken.
        """
        done = self._try(readings)
        if done is None:
            raise Overloaded(retry_after_s=1)
        return done

    def _try(self, readings: list[Reading]) -> tuple[int, int] | None:
        """:meth:`offer`, with None where a shard has no room for its share."""
        if not self._open:
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
        per_shard = split_by_shard(fresh, len(self.queues))
        for queue, share in zip(self.queues, per_shard, strict=True):
            if len(share) > queue.free():
                if len(share) > queue.capacity:
                    raise TooLarge(
                        f"{len(share)} new readings for one shard, whose queue holds at most "
                        f"{queue.capacity}; send smaller requests"
                    )
                return None
        ids = [r.sensor_id for r in fresh]
        self.registry.check(ids)
        self.registry.touch(ids, now)
        for queue, share in zip(self.queues, per_shard, strict=True):
            if share:
                queue.put(wire.pack(share))
        for key in keys:
            recent.add(key, now)
        return len(fresh), len(readings) - len(fresh)
