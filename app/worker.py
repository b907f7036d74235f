"""``sensorcast worker``: the Redis driver of the model stage.

Readings sit in ``partitions`` Redis streams (a sensor always in the same one). Each
partition is owned by one worker at a time through a lease (``lease:{p}``, renewed every
third of ``lease_ttl_s``), so a sensor's readings are scored in order, by one process,
against one copy of its model. Workers heartbeat in ``workers`` and each takes a fair share
of the partitions: a new worker gets some, a stopped one hands its share over at once, and a
dead one's leases expire and are taken over.

What happens between a batch and its predictions is the :class:`ShardRunner`'s, exactly as in
the embedded service (partition ``p`` runs in model process ``p % workers``). Owning a
partition:

1. restore: load the partition's checkpoint (its sensors' models, and the stream id they
   reflect) into the model process, then replay the entries acknowledged since, so the models
   are exactly where the previous owner left them;
2. claim the entries the previous owner read but never acknowledged (``XAUTOCLAIM``) and
   process them, in order, then read new ones (``XREADGROUP``), whole entries into batches
   of about ``batch_max_size`` readings, waiting ``batch_window_ms`` for a batch that is not
   full, with up to ``batches_in_flight`` batches queued in the runner;
3. for each batch, in order: publish the predictions and acknowledge the entries in one Lua
   script fenced by the lease, so a batch is published exactly once even if its owner dies
   half-way or was presumed dead;
4. every ``checkpoint_interval_s`` (or ``checkpoint_max_readings``): save the partition's
   models and trim the stream up to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import secrets
import signal
import socket
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from redis.exceptions import RedisError, ResponseError

from app.backends.redis import GROUP, RedisBackend, entry_readings
from app.config import Settings
from app.metrics import Metrics
from app.models import COMPILED
from app.pipeline import shard, wire
from app.pipeline.batcher import BatchObserver
from app.pipeline.ingest import SensorRegistry, sweep_period
from app.pipeline.pipeline import make_runners
from app.pipeline.runner import CheckpointCadence, Done, ShardRunner
from app.scheduling import shorten_loop_slice
from app.schemas import Reading

log = logging.getLogger(__name__)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Save a partition's checkpoint and trim its stream, fenced by the lease: a worker that lost
# the partition without knowing it yet must not overwrite its successor's checkpoint. In the
# same step, the models of sensors resumed since the last checkpoint leave ``models:{p}`` (the
# checkpoint has them now) and those of sensors evicted now go there (it no longer has them).
# KEYS: lease, ckpt, stream, models; ARGV: owner, last id, states, n evicted, n evicted
# (sensor id, model) pairs, then the resumed sensor ids.
_CHECKPOINT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], 'id', ARGV[2], 'states', ARGV[3])
redis.call('XTRIM', KEYS[3], 'MINID', ARGV[2])
local evicted = 5 + 2 * tonumber(ARGV[4])
for i = evicted, #ARGV do redis.call('HDEL', KEYS[4], ARGV[i]) end
for i = 5, evicted - 1, 2 do redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1]) end
return 1
"""

Entry = tuple[bytes, dict[bytes, bytes]]
ENTRIES_PER_READ = 64
"""Stream entries read at once (one entry holds one request's readings for a partition)."""


class LeaseLost(Exception):
    """Another worker owns the partition now."""


class _Batch:
    __slots__ = ("ids", "readings", "done")

    def __init__(self, ids: list[bytes], readings: wire.Packed, done: asyncio.Future[Done]):
        self.ids = ids
        self.readings = readings
        self.done = done


class Worker:
    """One ``sensorcast worker`` process: a model process per shard and the partitions it owns."""

    def __init__(self, settings: Settings, backend: RedisBackend) -> None:
        self.settings = settings
        self.backend = backend
        # redis-py types replies as unions of every shape; this module knows the shapes.
        self.redis: Any = backend.client
        self.id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.partitions = settings.partitions
        self.lease_ms = int(settings.lease_ttl_s * 1000)
        self.runners = make_runners(settings)
        self.owned: dict[int, asyncio.Task[None]] = {}
        self.tokens: dict[int, str] = {}
        """Each owned partition's lease value: this worker's id and a token of this ownership,
        so that a task of an earlier ownership (cancelled, not yet finished) is fenced off
        like another worker would be."""
        self._releasing: set[int] = set()
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)
        self._save = self.redis.register_script(_CHECKPOINT)
        self.observer: BatchObserver | None = None
        self.primary_changes = 0
        self.processed = 0
        self.published = 0
        self.last_seq = 0

    def key(self, name: str) -> str:
        return self.backend.key(name)

    # -- what the metrics read (app.metrics.ModelStage) ----------------------------------------

    def queue_figures(self) -> list[tuple[str, int, int, int]]:
        return []  # the partitions' backlogs are in Redis (``backlog:{p}``)

    def pending(self) -> int:
        return 0

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve partitions until ``stop`` is set, then hand them over and return."""
        await asyncio.gather(*(r.start() for r in self.runners))
        log.info(
            "worker %s: %d model processes ready (the default model %s)",
            self.id,
            len(self.runners),
            "compiled" if COMPILED else "from its Python source",
        )
        try:
            while not stop.is_set():
                try:
                    await self._balance()
                except (RedisError, OSError) as exc:
                    log.warning("worker %s: Redis unavailable (%s)", self.id, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.settings.lease_ttl_s / 3)
        finally:
            await self._release_all()
            with contextlib.suppress(RedisError, OSError):
                await self.redis.zrem(self.key("workers"), self.id)
            await asyncio.gather(*(r.stop() for r in self.runners))

    async def _balance(self) -> None:
        if self.backend.primary_changes != self.primary_changes:
            # What this worker wrote to the old primary lately may be missing on the new
            # one: start every partition over there, from its checkpoint and its unacknowledged
            # entries, as a worker taking a partition over does.
            self.primary_changes = self.backend.primary_changes
            for p, task in self.owned.items():
                if not task.done() and not task.cancelling():
                    log.warning("worker %s: partition %d restarts on the new primary", self.id, p)
                    task.cancel()
        now_ms = int(time.time() * 1000)
        workers = self.key("workers")
        await self.redis.zadd(workers, {self.id: now_ms})
        await self.redis.zremrangebyscore(workers, "-inf", now_ms - self.lease_ms)
        live = max(1, int(await self.redis.zcard(workers)))
        share = math.ceil(self.partitions / live)
        for p, task in list(self.owned.items()):
            if task.done():
                self.owned.pop(p)
                continue
            if task.cancelling():
                continue  # lost: not taken again until its task has finished
            renewed = await self._renew(
                keys=[self.key(f"lease:{p}")], args=[self.tokens[p], self.lease_ms]
            )
            if not renewed:
                log.warning("worker %s: lost the lease of partition %d", self.id, p)
                task.cancel()
        active = [
            p for p, t in self.owned.items() if p not in self._releasing and not t.cancelling()
        ]
        if len(active) > share:
            for p in active[share:]:
                self._releasing.add(p)
        elif len(active) < share:
            offset = int.from_bytes(self.id.encode()[-2:], "big")
            for i in range(self.partitions):
                if len(active) >= share:
                    break
                p = (offset + i) % self.partitions
                if p in self.owned:
                    continue
                token = f"{self.id}/{secrets.token_hex(4)}"
                taken = await self.redis.set(
                    self.key(f"lease:{p}"), token, nx=True, px=self.lease_ms
                )
                if taken:
                    self.tokens[p] = token
                    self.owned[p] = asyncio.create_task(self._serve(p), name=f"partition-{p}")
                    active.append(p)

    async def _release_all(self) -> None:
        self._releasing.update(self.owned)
        tasks = list(self.owned.values())
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=self.settings.shutdown_timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.owned.clear()

    # -- one partition ---------------------------------------------------------------------------

    async def _serve(self, p: int) -> None:
        runner = self.runners[p % len(self.runners)]
        stream = self.key(f"readings:{p}")
        log.info("worker %s: took partition %d", self.id, p)
        token = self.tokens[p]
        serving = _Partition(self, p, runner, token)
        try:
            await self._ensure_group(stream)
            await self._restore(serving)
            # Entries read by a previous owner and never acknowledged come first, in order.
            start: bytes | str = "0-0"
            while True:
                reply = await self.redis.xautoclaim(
                    stream, GROUP, self.id, min_idle_time=0, start_id=start,
                    count=ENTRIES_PER_READ,
                )  # fmt: skip
                start, entries = reply[0], reply[1]
                await serving.take(entries)
                if start in (b"0-0", "0-0"):
                    break
            window_s = self.settings.batch_window_ms / 1000
            while p not in self._releasing:
                # Block for new entries only when nothing is in flight to publish meanwhile.
                entries = await self._read(stream, None if serving.in_flight else 200)
                if entries and window_s > 0 and serving.short(entries):
                    # Give stragglers a moment to join a batch that is not full.
                    await asyncio.sleep(window_s)
                    entries += await self._read(stream, None)
                if entries:
                    await serving.take(entries)
                    await serving.complete(wait_all=False)
                elif serving.in_flight:
                    await serving.publish_oldest()
                if serving.cadence.due() or serving.sweep_due():
                    await serving.checkpoint()
            await serving.complete(wait_all=True)
            await serving.checkpoint()
        except LeaseLost:
            log.warning("worker %s: partition %d taken over", self.id, p)
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError) as exc:
            log.warning("worker %s: partition %d stopped: %s", self.id, p, exc)
        finally:
            self._releasing.discard(p)
            with contextlib.suppress(Exception):
                await runner.call(shard.drop_partition, p, self.partitions, mutates=True)
            with contextlib.suppress(RedisError, OSError):
                await self._release(keys=[self.key(f"lease:{p}")], args=[token])

    async def _read(self, stream: str, block_ms: int | None) -> list[Entry]:
        reply = await self.redis.xreadgroup(
            GROUP, self.id, {stream: ">"}, count=ENTRIES_PER_READ, block=block_ms
        )
        return list(reply[0][1]) if reply else []

    async def _ensure_group(self, stream: str) -> None:
        try:
            await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _restore(self, serving: _Partition) -> None:
        """Bring the model process's copy of the partition's models up to date."""
        p, runner = serving.p, serving.runner
        stream = self.key(f"readings:{p}")
        checkpoint = await self.redis.hgetall(self.key(f"ckpt:{p}"))
        after = checkpoint.get(b"id", b"0-0")
        if b"states" in checkpoint:
            restored = await runner.call(shard.import_states, checkpoint[b"states"], mutates=True)
            serving.sensors.touch(restored, time.time())
        # Replay what was acknowledged since the checkpoint: not pending, already delivered.
        pending = {
            e["message_id"]
            for e in await self.redis.xpending_range(stream, GROUP, "-", "+", 1_000_000)
        }
        delivered = b"0-0"
        for group in await self.redis.xinfo_groups(stream):
            if group["name"] in (GROUP, GROUP.encode()):
                delivered = group["last-delivered-id"]
        replayed = 0
        lower = b"(" + after if after != b"0-0" else b"-"
        while delivered != b"0-0":
            entries = await self.redis.xrange(stream, min=lower, max=delivered, count=256)
            if not entries:
                break
            readings: list[Reading] = []
            for entry_id, fields in entries:
                if entry_id not in pending:
                    readings.extend(entry_readings(fields))
            if readings:
                await serving.resume(readings)
                blob = wire.encode_readings(readings)
                await runner.call(shard.run_batch, blob, True, mutates=True)
                replayed += len(readings)
            lower = b"(" + entries[-1][0]
        if replayed or b"states" in checkpoint:
            log.info("partition %d: restored (%d readings replayed)", p, replayed)


class _Partition:
    """The batches of one owned partition: submitted in order, published-and-acked in order."""

    def __init__(self, worker: Worker, p: int, runner: ShardRunner, token: str) -> None:
        self.worker = worker
        self.token = token
        self.p = p
        self.runner = runner
        settings = worker.settings
        self.max_size = settings.batch_max_size
        self.max_in_flight = settings.batches_in_flight
        self.cadence = CheckpointCadence(
            settings.checkpoint_max_readings, settings.checkpoint_interval_s
        )
        self.in_flight: deque[_Batch] = deque()
        self.last_acked: bytes | None = None
        self.sensors = SensorRegistry(settings.max_sensors)
        """The sensors whose models this ownership holds, with when each was last seen."""
        self.resumed: set[str] = set()
        """Sensors brought back from ``models:{p}`` since the last checkpoint."""
        self.idle_s = settings.sensor_idle_evict_s
        self.next_sweep = time.monotonic() + sweep_period(self.idle_s)

    async def take(self, entries: list[Entry]) -> None:
        """Cut entries into batches of whole entries, about ``batch_max_size`` readings each."""
        ids: list[bytes] = []
        readings: list[Reading] = []
        for entry_id, fields in entries:
            # A claimed entry that was trimmed meanwhile has no fields.
            more = entry_readings(fields) if fields else []
            if readings and len(readings) + len(more) > self.max_size:
                await self._submit(ids, readings)
                ids, readings = [], []
            ids.append(entry_id)
            readings.extend(more)
        if ids:
            await self._submit(ids, readings)

    def short(self, entries: list[Entry]) -> bool:
        """Fewer readings than a full batch (a cheap upper bound on the count)."""
        return (
            len(entries) < ENTRIES_PER_READ
            and sum(len(fields.get(b"m", b"")) for _, fields in entries) < self.max_size
        )

    async def _submit(self, ids: list[bytes], readings: list[Reading]) -> None:
        while len(self.in_flight) >= self.max_in_flight:
            await self.publish_oldest()
        done: asyncio.Future[Done]
        if readings:
            await self.resume(readings)
            batch = wire.pack(readings)
            done = self.runner.submit(batch)
        else:
            batch = wire.Packed(b"", 0, 0.0, 0.0)
            done = asyncio.get_running_loop().create_future()
            done.set_result(Done(wire.BatchOutcome(b"", 0, 0, 0), None))
        self.in_flight.append(_Batch(ids, batch, done))

    async def resume(self, readings: list[Reading]) -> None:
        """Before the first readings of a sensor in this ownership: bring its model back from
        ``models:{p}`` when it was evicted as idle."""
        seen = self.sensors.last_seen
        ids = {r.sensor_id for r in readings}
        new = [sid for sid in ids if sid not in seen]
        if new:
            worker = self.worker
            models = await worker.redis.hmget(worker.key(f"models:{self.p}"), new)
            found = [(sid, blob) for sid, blob in zip(new, models, strict=True) if blob]
            if found:
                await self.runner.call(
                    shard.import_states, *(blob for _, blob in found), mutates=True
                )
                self.resumed.update(sid for sid, _ in found)
        self.sensors.touch(ids, time.time())

    def sweep_due(self) -> bool:
        return self.idle_s > 0 and time.monotonic() >= self.next_sweep

    async def complete(self, wait_all: bool) -> None:
        """Publish the batches that are done (all of them, with ``wait_all``)."""
        while self.in_flight and (wait_all or self.in_flight[0].done.done()):
            await self.publish_oldest()

    async def publish_oldest(self) -> None:
        """Wait for the oldest batch in flight, publish its predictions, ack its entries."""
        batch = self.in_flight[0]
        done = await batch.done
        outcome = done.outcome
        worker = self.worker
        first = await worker.backend.publish_and_ack(
            outcome.payload, outcome.messages, self.p, self.token, batch.readings.size, batch.ids
        )
        if first < 0:
            raise LeaseLost
        self.in_flight.popleft()
        self.last_acked = batch.ids[-1]
        worker.processed += batch.readings.size
        if outcome.messages:
            worker.published += outcome.messages
            worker.last_seq = max(worker.last_seq, first + outcome.messages - 1)
        self.cadence.add(batch.readings.size)
        if worker.observer is not None and batch.readings.size:
            worker.observer(batch.readings, done)

    async def checkpoint(self) -> None:
        """Save the partition's models as of the last acknowledged entry; trim the stream.
        When a sweep is due, the sensors idle for ``sensor_idle_evict_s`` leave the model
        process in the same step, their models kept in ``models:{p}`` until they return."""
        await self.complete(wait_all=True)
        idle: list[str] = []
        if self.sweep_due():
            self.next_sweep = time.monotonic() + sweep_period(self.idle_s)
            if self.last_acked is not None:
                idle = self.sensors.idle(time.time() - self.idle_s)
        if self.last_acked is None or not (self.cadence.readings or idle):
            return
        worker, p, runner = self.worker, self.p, self.runner
        evicted = await runner.call(shard.evict_sensors, idle, True, mutates=True) if idle else {}
        states = await runner.call(shard.export_states, p, worker.partitions)
        keys = [worker.key(name) for name in (f"lease:{p}", f"ckpt:{p}", f"readings:{p}")]
        keys.append(worker.key(f"models:{p}"))
        pairs = itertools.chain.from_iterable(evicted.items())
        args: list[Any] = [self.token, self.last_acked, states, len(evicted), *pairs]
        args.extend(self.resumed)
        if not await worker._save(keys=keys, args=args):
            raise LeaseLost
        self.resumed.clear()
        self.cadence.reset()
        if evicted:
            log.info("partition %d: evicted %d idle sensors", p, len(evicted))


async def _serve_metrics(metrics: Metrics, host: str, port: int) -> None:
    """``GET /metrics`` and ``GET /healthz`` of a worker, on their own small server."""
    import uvicorn
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def scrape(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # the worker handles SIGTERM itself (hand its partitions over)

    app = Starlette(routes=[Route("/metrics", scrape), Route("/healthz", healthz)])
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False)
    try:
        await _Server(config).serve()
    except SystemExit:  # uvicorn's word for a port it could not bind (logged above)
        log.error("SENSORCAST_METRICS_PORT: cannot serve metrics on %s:%d", host, port)
        raise


async def run_worker(settings: Settings) -> int:
    """Run the worker role until SIGTERM/SIGINT; hand partitions over, then return 0."""
    shorten_loop_slice(settings.loop_slice_us)
    backend = RedisBackend(
        settings.backend,
        timeout_s=settings.redis_timeout_s,
        min_replicas=settings.redis_min_replicas,
        replica_timeout_ms=settings.redis_replica_timeout_ms,
    )
    await backend.connect()
    worker = Worker(settings, backend)
    metrics = Metrics()
    worker.observer = metrics.observe_batch
    metrics.bind(worker, None, None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server: asyncio.Task[None] | None = None
    if settings.metrics_port is not None:
        server = asyncio.create_task(
            _serve_metrics(metrics, settings.host, settings.metrics_port), name="metrics"
        )
    try:
        await worker.run(stop)
    finally:
        if server is not None:
            server.cancel()
            await asyncio.gather(server, return_exceptions=True)
        await backend.disconnect()
    log.info("worker %s: stopped after %d readings", worker.id, worker.processed)
    return 0
