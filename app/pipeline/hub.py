"""The prediction hub: history, per-sensor summaries and fan-out to WebSocket subscribers.

The hub reads the backend's ``predictions`` channel (so every API replica sees every message),
keeps a bounded history indexed by ``seq`` for resumes, and passes each batch to every
subscriber whose filter matches: written at once to an idle subscriber whose socket has room
(encoded once for all of them, as ``websockets``' ``broadcast()`` does), else queued in its
bounded queue for its relay. It never awaits a subscriber: a slow client only ever fills its
own queue, and the configured policy decides what it loses. Frames are the publisher's
encoded text; the hub hands the same string to every subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import re
import time
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from itertools import accumulate, chain
from typing import Any

from app.backends.base import Backend, Numbered
from app.config import SlowClientPolicy
from app.pipeline.alarm_book import AlarmBook
from app.pipeline.wire import (
    CHANNEL,
    Message,
    client_frames,
    decode_batch,
    frames,
    text_frames,
    unpack_batch,
)
from app.turns import turn

log = logging.getLogger(__name__)

DISPATCH_SLICE = 256
"""Messages dispatched between two yields to the event loop."""
SNAPSHOT_SLICE = 256
"""Sensors of a snapshot sent between two yields to the event loop."""
SENSOR_PAGE_MAX = 1000
"""The most sensors one ``GET /v1/sensors`` page describes."""

RECENT_PER_SENSOR = 20
REAP_LOG_INTERVAL_S = 10.0
REAP_SLICE = 64
"""Stalled subscribers closed between two yields to the event loop."""
_GLOB_CHARS = frozenset("*?[")


class SensorFilter:
    """Which messages a subscriber wants: sensor ids or globs, and anomalies only.

    Model and alarm frames follow the sensor filter; ``anomalies_only`` concerns predictions
    alone (alarm frames count as anomalies).

    Examples:
        >>> f = SensorFilter(["pump-*", "fan-1"])
        >>> [f.wants_sensor(s) for s in ("pump-7", "fan-1", "fan-2")]
        [True, True, False]
        >>> SensorFilter([]).wants_sensor("anything")
        True
    """

    __slots__ = ("sensors", "anomalies_only", "everything", "key", "_ids", "_glob", "_cache")

    def __init__(self, sensors: Iterable[str] = (), anomalies_only: bool = False) -> None:
        self.sensors = sorted(set(sensors))
        self.anomalies_only = anomalies_only
        self.everything = not self.sensors
        self.key = (tuple(self.sensors), anomalies_only)
        """Equal for equal filters: the hub filters a batch once per distinct filter."""
        self._ids = {s for s in self.sensors if not _GLOB_CHARS.intersection(s)}
        globs = [s for s in self.sensors if s not in self._ids]
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

    def select(self, messages: list[Message]) -> list[Message]:
        if self.everything and not self.anomalies_only:
            return messages
        return [m for m in messages if self.wants(m)]


MESSAGE_OVERHEAD = 224
"""Bytes a kept message takes besides its frame's text: the ``Message`` struct, the string's
header, its ``seq`` and running total, and its slots in the history's lists (measured with
tracemalloc; ``tests/test_hub.py`` checks the bound holds)."""


_GONE = Message(0, "", "", False, "")
"""Stands in the history's list for a message that fell out, until the list is compacted."""


class History:
    """Recent messages in ``seq`` order, bounded by count, by the memory they take (their
    frames plus :data:`MESSAGE_OVERHEAD` each) and by age.

    Parallel lists with a moving head rather than a deque, so that :meth:`after` finds a
    resume point by bisection, and so does the size bound (on running totals of the frames'
    lengths); the dead prefix is compacted once it is a quarter of the lists.

    Examples:
        >>> from app.pipeline.wire import Message
        >>> h = History(max_frames=3, max_age_s=60)
        >>> h.extend([Message(s, "prediction", "a", False, str(s)) for s in range(1, 6)], now=0)
        >>> h.oldest_seq, [m.seq for m in h.after(3)], len(h)
        (3, [4, 5], 3)
        >>> h = History(max_frames=10, max_age_s=60, max_bytes=2 * (MESSAGE_OVERHEAD + 2))
        >>> h.extend([Message(s, "prediction", "a", False, "ab") for s in range(1, 6)], now=0)
        >>> [m.seq for m in h.after(0)]
        [4, 5]
    """

    def __init__(self, max_frames: int, max_age_s: float, max_bytes: int | None = None) -> None:
        self.max_frames = max_frames
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self._seqs: list[int] = []
        self._messages: list[Message] = []
        self._times: list[float] = []
        self._ends: list[int] = []
        """Running total of the frames' lengths, up to and including each message."""
        self._base = 0
        """The running total before the first message kept in the lists."""
        self._head = 0

    def __len__(self) -> int:
        return len(self._seqs) - self._head

    @property
    def oldest_seq(self) -> int | None:
        return self._seqs[self._head] if len(self) else None

    def extend(self, messages: list[Message], now: float) -> None:
        self._seqs.extend([m.seq for m in messages])
        self._messages.extend(messages)
        self._times.extend([now] * len(messages))
        ends = self._ends
        sizes = [len(m.frame) + MESSAGE_OVERHEAD for m in messages]
        ends.extend(accumulate(sizes, initial=self._before(len(ends))))
        del ends[-len(messages) - 1]  # accumulate's initial value
        self.trim(now)

    def _before(self, index: int) -> int:
        """The running total of the frames before ``index``."""
        return self._ends[index - 1] if index else self._base

    def trim(self, now: float) -> None:
        head = max(self._head, len(self._seqs) - self.max_frames)
        ends = self._ends
        if self.max_bytes is not None and ends:
            floor = ends[-1] - self.max_bytes
            if floor > self._before(head):
                # Keep the messages after the first whose running total reaches the floor.
                head = bisect_left(ends, floor, lo=head) + 1
        horizon = now - self.max_age_s
        times = self._times
        if head < len(times) and times[head] < horizon:
            head = bisect_right(times, horizon, lo=head)
        if head > self._head:
            # What falls out goes now, not at the next compaction: only the slots stay.
            self._messages[self._head : head] = [_GONE] * (head - self._head)
        self._head = head
        if head > 1024 and head * 4 > len(self._seqs):
            self._base = ends[head - 1]
            del self._seqs[:head], self._messages[:head], self._times[:head], ends[:head]
            self._head = 0

    def clear(self) -> None:
        """Forget every message."""
        self._seqs, self._messages, self._times, self._ends = [], [], [], []
        self._base = self._head = 0

    def after(self, seq: int) -> list[Message]:
        """The kept messages numbered above ``seq``, in order."""
        start = bisect_right(self._seqs, seq, lo=self._head)
        return self._messages[start:]


class Subscriber:
    """One client's bounded queue of messages.

    The hub calls :meth:`push_many`, which never blocks; the client's relay task waits on
    :attr:`wake` and :meth:`take` s everything queued. When the queue is full the policy
    applies: ``drop_oldest`` drops the oldest messages, ``latest_per_sensor`` keeps only the
    newest message of each sensor (still in ``seq`` order), and ``disconnect`` sets
    :attr:`overflowed` and queues nothing more. :attr:`dropped` counts what was lost since
    the relay last reported it.

    The queue holds the hub's batches themselves (lists shared by every subscriber of a
    filter, never changed), not their messages: a push costs one append whatever the batch's
    size, and a subscriber that stopped reading costs the garbage collector one reference per
    batch rather than one per message (1,500 such queues of 10,000 messages each made every
    full collection a pause of a second).
    """

    __slots__ = (
        "filter", "max_frames", "policy", "batch", "queue", "head", "queued", "latest",
        "floor", "dropped", "dropped_total", "overflowed", "wake", "busy_since", "on_stall",
        "direct",
    )  # fmt: skip

    def __init__(
        self,
        filter: SensorFilter,
        max_frames: int,
        policy: SlowClientPolicy,
        batch: bool = False,
    ) -> None:
        self.filter = filter
        self.max_frames = max_frames
        self.policy = policy
        self.batch = batch
        """The client takes ``predictions`` frames (see :func:`client_frames`)."""
        self.queue: deque[list[Message]] = deque()
        """Batches in ``seq`` order; the first one from index :attr:`head` on."""
        self.head = 0
        self.queued = 0
        """Messages queued."""
        self.latest: dict[tuple[str, str], Message] | None = None
        """With ``latest_per_sensor``, once the queue overflowed: the conflated queue."""
        self.floor = 0
        """Messages numbered at or below this are skipped (already delivered by a replay)."""
        self.dropped = 0
        """Messages dropped since the relay last sent a ``lagged`` notice."""
        self.dropped_total = 0
        """Messages dropped over the subscriber's life (for metrics)."""
        self.overflowed = False
        self.wake = asyncio.Event()
        self.busy_since: float | None = None
        """Set by the relay while it has frames to send, to when the socket last took one:
        the hub reaps a subscriber whose socket took nothing for its stall timeout."""
        self.on_stall: Callable[[], object] | None = None
        self.direct: Callable[[bytes, int], bool] | None = None
        """Set by the relay while it is idle (nothing queued) and its socket can take
        encoded frames: the hub writes ``(frames, last seq)`` through it at once, skipping the
        queue and the relay's wake-up; False means no room now, and the batch is queued."""

    def push_many(self, messages: list[Message]) -> None:
        """Queue a batch (kept as it is: the caller never changes it afterwards)."""
        # Once anything is queued, nothing may overtake it: no direct writes until the
        # relay has sent the queue and is idle again.
        self.direct = None
        if not messages or self.overflowed:
            return
        if messages[0].seq <= self.floor:
            messages = [m for m in messages if m.seq > self.floor]
            if not messages:
                return
        if self.latest is not None:
            self._conflate(messages)
        elif self.queued + len(messages) <= self.max_frames:
            self.queue.append(messages)
            self.queued += len(messages)
        elif self.policy is SlowClientPolicy.drop_oldest:
            self.queue.append(messages)
            self.queued += len(messages)
            self._drop_oldest(self.queued - self.max_frames)
        elif self.policy is SlowClientPolicy.latest_per_sensor:
            self._conflate(messages)
        else:
            self.overflowed = True
            self._clear()
        self.wake.set()

    def push_notice(self, message: Message) -> None:
        """Queue a frame every subscriber must get, in order, whatever its filter and policy
        (a ``gap`` frame)."""
        self.direct = None  # nothing may overtake it
        if self.overflowed:
            return
        if self.latest is not None:
            self.latest[(message.kind, message.sensor_id)] = message
            self.queued = len(self.latest)
        else:
            self.queue.append([message])
            self.queued += 1
        self.wake.set()

    def _drop_oldest(self, excess: int) -> None:
        self._lose(excess)
        self.queued -= excess
        queue = self.queue
        while excess:
            rest = len(queue[0]) - self.head
            if rest > excess:
                self.head += excess
                return
            queue.popleft()
            self.head = 0
            excess -= rest

    def _messages(self) -> Iterable[Message]:
        """The queued messages in order (the queue unchanged)."""
        if not self.queue:
            return ()
        if self.head:
            first, *rest = self.queue
            return chain(first[self.head :], *rest)
        return chain.from_iterable(self.queue)

    def _clear(self) -> None:
        self.queue.clear()
        self.head = 0
        self.queued = 0

    def _conflate(self, messages: list[Message]) -> None:
        latest = self.latest
        if latest is None:
            latest = self.latest = {}
            self._conflate_into(latest, self._messages())
            self._clear()
        self._conflate_into(latest, messages)
        while len(latest) > self.max_frames:
            # More distinct sensors than room: the oldest sensor's message goes.
            del latest[next(iter(latest))]
            self._lose(1)
        self.queued = len(latest)

    def _conflate_into(
        self, latest: dict[tuple[str, str], Message], items: Iterable[Message]
    ) -> None:
        # Re-inserting a key moves it last, so the dict stays in seq order.
        pop = latest.pop
        dropped = 0
        for m in items:
            key = (m.kind, m.sensor_id)
            if pop(key, None) is not None:
                dropped += 1
            latest[key] = m
        self._lose(dropped)

    def _lose(self, count: int) -> None:
        self.dropped += count
        self.dropped_total += count

    def take(self) -> list[Message]:
        """Everything queued, in ``seq`` order; the queue is left empty."""
        if self.latest is not None:
            taken = list(self.latest.values())
            self.latest = None
            self.queued = 0
        else:
            taken = list(self._messages())
            self._clear()
        self.wake.clear()
        return taken

    def retain(self, wanted: Callable[[Message], bool]) -> None:
        """Keep only the queued messages that ``wanted`` accepts (a filter change)."""
        if self.latest is not None:
            self.latest = {k: m for k, m in self.latest.items() if wanted(m)}
            self.queued = len(self.latest)
            return
        kept = [m for m in self._messages() if wanted(m)]
        self._clear()
        if kept:
            self.queue.append(kept)
            self.queued = len(kept)


@dataclass
class SensorSummary:
    sensor_id: str
    count: int = 0
    anomalies: int = 0
    model_version: int = 0
    last: str | None = None
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=RECENT_PER_SENSOR))


@dataclass
class Subscription:
    """What a new subscriber is owed before its live stream, taken in one synchronous step."""

    subscriber: Subscriber
    replay: list[Message]
    """Kept messages after ``since`` that match the filter."""
    snapshot: list[str]
    """With a snapshot asked for, every sensor id known at subscription, in order; the relay
    sends their latest predictions in slices (:meth:`PredictionHub.snapshot_frames`)."""
    gap: dict[str, Any] | None
    """The ``gap`` frame owed first, if ``since`` reaches beyond what is kept."""
    alarms: list[str] = field(default_factory=list)
    """With a snapshot asked for, the active alarms of the matching sensors (their frames)."""


class PredictionHub:
    """Receives published messages and fans them out.

    Args:
        backend: Where messages come from (``subscribe(CHANNEL)``) and the epoch is read.
        history_max_frames: Messages kept for resumes.
        history_max_bytes: Memory the messages kept for resumes may take.
        history_max_age_s: How long a message is kept for resumes.
        subscriber_queue_frames: Each subscriber's queue bound.
        policy: What happens to a subscriber whose queue is full.
        stall_timeout_s: A subscriber whose socket takes nothing for this long is dropped
            (its ``on_stall`` closes the connection).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        history_max_frames: int,
        history_max_age_s: float,
        history_max_bytes: int | None = None,
        subscriber_queue_frames: int,
        policy: SlowClientPolicy,
        stall_timeout_s: float = 60.0,
    ) -> None:
        self.backend = backend
        self.history = History(history_max_frames, history_max_age_s, history_max_bytes)
        self.subscriber_queue_frames = subscriber_queue_frames
        self.policy = policy
        self.stall_timeout_s = stall_timeout_s
        self.subscribers: set[Subscriber] = set()
        self.sensors: dict[str, SensorSummary] = {}
        self.alarms = AlarmBook()
        self._ordered: list[str] = []
        """Sensor ids in order, except those in ``_added``; may hold evicted ids until
        :meth:`sensor_ids` next runs."""
        self._added: list[str] = []
        self._gone: set[str] = set()
        """Evicted ids still in ``_ordered``."""
        self.evicted_predictions = 0
        """Predictions and anomalies of evicted sensors, so the totals never go down."""
        self.evicted_anomalies = 0
        self.latest_seq = 0
        self.epoch = ""
        self.closing = False
        """Set at shutdown: relays flush their queues and close with 1001."""
        self.reaped = 0
        """Subscribers dropped because their socket stalled (``stalled_disconnects``)."""
        self.slow_disconnects = 0
        """Subscribers that left after overflowing (policy ``disconnect``)."""
        self._dropped_gone = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._listening = asyncio.Event()
        self._attempted = asyncio.Event()
        self._changed = asyncio.Event()

    @property
    def listening(self) -> bool:
        """Connected to the backend's stream, the epoch known and the history loaded."""
        return self._listening.is_set()

    async def start(self) -> None:
        """Start listening; return once connected, or after the first failed attempt (a
        backend that is down at start, Redis say, is retried until it answers)."""
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._listen(), name="hub-listen"),
                asyncio.create_task(self._reap(), name="hub-reap"),
            ]
            await self._attempted.wait()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

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

    async def _connect(self, stack: contextlib.AsyncExitStack) -> AsyncIterator[Numbered]:
        """Read the epoch, subscribe and load what the backend kept, retrying with backoff
        until the backend answers; the subscription is left open on ``stack``."""
        delay = 0.1
        while True:
            try:
                async with contextlib.AsyncExitStack() as attempt:
                    epoch = await self.backend.epoch()
                    payloads = await attempt.enter_async_context(self.backend.subscribe(CHANNEL))
                    # What the backend kept (Redis) fills the history, so resumes work on a
                    # replica that has just started.
                    kept = await self.backend.recent(CHANNEL, self.history.max_frames)
                    stack.push_async_exit(attempt.pop_all())
                    break
            except Exception as exc:  # whatever the backend raises while it is unreachable
                self._attempted.set()
                log.warning("backend not reachable (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.epoch = epoch
        for first, payload in kept:
            self.dispatch(decode_batch(first, payload, epoch))
        self._listening.set()
        self._attempted.set()
        return payloads

    async def _listen(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            payloads = await self._connect(stack)
            async for first, payload in payloads:
                if first == 0:
                    epoch, _, from_seq = payload.decode().partition(" ")
                    self.renumber(epoch, int(from_seq))
                    continue
                try:
                    bodies = unpack_batch(payload)
                except Exception:
                    log.exception("dropping a malformed message batch")
                    continue
                # A batch of thousands is numbered and dispatched in slices, each under a
                # turn, so no single step holds the loop for long. A subscriber that registers
                # between two slices gets the first in its replay and the rest live.
                for start in range(0, len(bodies), DISPATCH_SLICE):
                    async with turn():
                        chunk = bodies[start : start + DISPATCH_SLICE]
                        self.dispatch(frames(first + start, chunk, self.epoch))

    async def _reap(self) -> None:
        # A peer that takes no bytes at all cannot be reached by a close frame either;
        # its relay is cancelled so that its queue and task go, and the connection closes
        # (the socket's own buffers are bounded by ``ws_send_buffer_bytes``).
        # Logged at most once per interval with the count: a flood of dead peers must not
        # become a flood of log lines.
        period = max(0.05, min(1.0, self.stall_timeout_s / 4))
        unlogged = 0
        next_log = 0.0
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            horizon = now - self.stall_timeout_s
            stalled = [
                sub
                for sub in self.subscribers
                if sub.busy_since is not None and sub.busy_since < horizon and sub.on_stall
            ]
            # Closing a connection takes a few task steps: hundreds at once (a flood of
            # silent sockets, all filled by the same batch) would hold the loop together.
            for start in range(0, len(stalled), REAP_SLICE):
                async with turn():
                    for sub in stalled[start : start + REAP_SLICE]:
                        if sub in self.subscribers and sub.on_stall is not None:
                            self.reaped += 1
                            unlogged += 1
                            sub.on_stall()
                            self.unsubscribe(sub)
                if start + REAP_SLICE < len(stalled):
                    await asyncio.sleep(0)  # let the closes of this slice run first
            if unlogged and now >= next_log:
                log.warning(
                    "closed %d subscribers (1013) whose socket took nothing for %g s",
                    unlogged, self.stall_timeout_s,
                )  # fmt: skip
                unlogged = 0
                next_log = now + REAP_LOG_INTERVAL_S

    def renumber(self, epoch: str, from_seq: int) -> None:
        """The numbering changed under the hub (a Redis replica was promoted, or Redis lost
        its data): every subscriber gets a ``gap`` frame with ``reason: "epoch_changed"``,
        in order with its messages, then the messages of the new epoch from ``from_seq``.

        What it received after the last message it had before the gap may be repeated or
        missing in the new epoch, so the frame asks it to resynchronise. The history of the
        old epoch is dropped: a resume in the new epoch must not be served the old one's
        numbers.
        """
        if epoch == self.epoch:
            return
        gap = {
            "type": "gap", "epoch": epoch, "previous_epoch": self.epoch,
            "reason": "epoch_changed", "since": self.latest_seq, "from_seq": from_seq,
        }  # fmt: skip
        message = Message(from_seq - 1, "gap", "", False, json.dumps(gap, separators=(",", ":")))
        self.epoch = epoch
        self.latest_seq = from_seq - 1
        self.history.clear()
        for sub in self.subscribers:
            sub.floor = 0
            sub.push_notice(message)
        self._changed.set()

    def dispatch(self, messages: list[Message]) -> None:
        """Record a batch and push it to every matching subscriber (never awaits)."""
        if not messages:
            return
        now = time.monotonic()
        sensors = self.sensors
        for message in messages:
            summary = sensors.get(message.sensor_id)
            if summary is None:
                summary = sensors[message.sensor_id] = SensorSummary(message.sensor_id)
                if self._gone and message.sensor_id in self._gone:
                    self._gone.discard(message.sensor_id)  # back, and still in _ordered
                else:
                    self._added.append(message.sensor_id)
            if message.kind == "model":
                summary.model_version = json.loads(message.frame).get("model_version", 0)
            elif message.kind == "alarm":
                self.alarms.apply(json.loads(message.frame), message.frame)
            else:
                summary.count += 1
                summary.last = message.frame
                summary.recent.append(message.frame)
                if message.is_anomaly:
                    summary.anomalies += 1
        self.history.extend(messages, now)
        self.latest_seq = max(self.latest_seq, messages[-1].seq)
        self._changed.set()
        # As websockets' broadcast(): a subscriber whose relay is idle and whose socket has
        # room gets the frames written at once, encoded once per filter and frame kind;
        # the others get the batch queued and their relay woken.
        selected: dict[tuple[tuple[str, ...], bool], list[Message]] = {}
        encoded: dict[tuple[tuple[tuple[str, ...], bool], bool], bytes] = {}
        for sub in self.subscribers:
            f = sub.filter
            if f.everything and not f.anomalies_only:
                chosen = messages
            else:
                found = selected.get(f.key)
                if found is None:
                    found = selected[f.key] = f.select(messages)
                chosen = found
            direct = sub.direct
            if direct is not None and chosen and chosen[0].seq > sub.floor:
                key = (f.key, sub.batch)
                data = encoded.get(key)
                if data is None:
                    texts = [text for text, _ in client_frames(chosen, sub.batch)]
                    data = encoded[key] = text_frames(texts)
                if direct(data, chosen[-1].seq):
                    continue
            sub.push_many(chosen)

    def subscribe(
        self,
        filter: SensorFilter,
        since: int | None = None,
        epoch: str | None = None,
        snapshot: bool = False,
        batch: bool = False,
    ) -> Subscription:
        """Register a subscriber with what it is owed before its live stream.

        Registration, replay and snapshot are taken in one synchronous step, so the live
        stream continues exactly where they end: no duplicates and no holes.

        Args:
            filter: What the subscriber wants.
            since: Resume after this ``seq``; ``None`` starts from now.
            epoch: The epoch ``since`` belongs to. When it is not this hub's (or, without it,
                when ``since`` is above anything numbered here), numbering restarted: the
                gap frame says so and every kept message of the current epoch is replayed.
            snapshot: Also return the latest prediction of each matching sensor, and the
                active alarms of those sensors.
            batch: The client takes ``predictions`` frames.
        """
        sub = Subscriber(filter, self.subscriber_queue_frames, self.policy, batch)
        self.subscribers.add(sub)
        self.history.trim(time.monotonic())
        frames = self.sensor_ids() if snapshot else []
        alarms = self.alarms.snapshot(filter.wants_sensor) if snapshot else []
        if since is None:
            return Subscription(sub, [], frames, None, alarms)
        oldest = self.history.oldest_seq or self.latest_seq + 1
        gap: dict[str, Any] | None = None
        if (epoch is not None and epoch != self.epoch) or (
            epoch is None and since > self.latest_seq
        ):
            gap = {
                "type": "gap", "epoch": self.epoch, "previous_epoch": epoch,
                "reason": "epoch_changed", "since": since,
                "from_seq": 1, "to_seq": oldest - 1, "missed": oldest - 1,
            }  # fmt: skip
            since = 0
        elif since + 1 < oldest:
            gap = {
                "type": "gap", "epoch": self.epoch, "reason": "expired", "since": since,
                "from_seq": since + 1, "to_seq": oldest - 1, "missed": oldest - 1 - since,
            }  # fmt: skip
        elif since > self.latest_seq:
            # This replica has not yet seen what the client saw elsewhere: skip it live.
            sub.floor = since
        replay = filter.select(self.history.after(since))
        return Subscription(sub, replay, frames, gap, alarms)

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

    def _refresh_order(self) -> list[str]:
        # Kept up to date lazily: evicted ids are filtered out, and ids added since are
        # sorted and merged in (timsort merges two sorted runs in linear time), so no call
        # sorts the whole set again.
        if self._gone:
            gone = self._gone
            self._ordered = [sid for sid in self._ordered if sid not in gone]
            gone.clear()
        if self._added:
            self._added.sort()
            self._ordered += self._added
            self._ordered.sort()
            self._added = []
        return self._ordered

    def sensor_ids(self) -> list[str]:
        """Every known sensor id, in order (a fresh list)."""
        return self._refresh_order().copy()

    def snapshot_frames(self, sensor_ids: list[str], filter: SensorFilter) -> list[str]:
        """The latest prediction of each of ``sensor_ids`` the filter wants (evicted ones
        and those without a prediction are skipped), in the order given.

        ``anomalies_only`` does not apply: the snapshot is each sensor's current state.
        """
        # Marked, so that a resuming client can tell them from the replay that follows.
        sensors = self.sensors
        frames = []
        for sid in sensor_ids:
            s = sensors.get(sid)
            if s is not None and s.last is not None and filter.wants_sensor(sid):
                frames.append(s.last[:-1] + ',"snapshot":true}')
        return frames

    def sensor_page(
        self, limit: int = SENSOR_PAGE_MAX, after: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Up to ``limit`` sensors ordered by id, those after ``after`` only; and the cursor
        of the next page (the last id of this one), or None on the last page.

        A sensor known throughout a walk of the pages appears on exactly one of them.
        """
        ids = self._refresh_order()
        start = bisect_right(ids, after) if after is not None else 0
        chosen = ids[start : start + limit]
        sensors = self.sensors
        page = [self._describe(sensors[sid], recent=False) for sid in chosen]
        more = start + limit < len(ids)
        return page, (chosen[-1] if more and chosen else None)

    def sensor_list(self) -> list[dict[str, Any]]:
        return [self._describe(self.sensors[sid], recent=False) for sid in self.sensor_ids()]

    def evict(self, sensor_ids: Iterable[str]) -> int:
        """Forget sensors (their summaries and recent predictions); returns how many were
        known. Messages already in the history stay until they age out."""
        self._refresh_order()  # every known id is in _ordered now
        gone = 0
        sensors = self.sensors
        for sid in sensor_ids:
            summary = sensors.pop(sid, None)
            if summary is not None:
                gone += 1
                self._gone.add(sid)
                self.evicted_predictions += summary.count
                self.evicted_anomalies += summary.anomalies
        return gone

    def sensor(self, sensor_id: str) -> dict[str, Any] | None:
        summary = self.sensors.get(sensor_id)
        return None if summary is None else self._describe(summary, recent=True)

    def _describe(self, s: SensorSummary, *, recent: bool) -> dict[str, Any]:
        last = json.loads(s.last) if s.last else None
        out: dict[str, Any] = {
            "sensor_id": s.sensor_id,
            "count": s.count,
            "anomalies": s.anomalies,
            "model_version": max(s.model_version, last["model_version"] if last else 0),
            "last_reading": (
                {"ts": last["ts"], "values": last["values"], "id": last.get("id")} if last else None
            ),
            "last_prediction": last,
        }
        if recent:
            out["recent_predictions"] = [json.loads(f) for f in s.recent]
        return out
