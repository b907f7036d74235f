"""``sensorcast worker``: the compute role when scaled out on Redis.

Readings sit in ``partitions`` Redis streams (a sensor always in the same one). Each
partition is owned by one worker at a time through a lease (``lease:{p}``, renewed every
third of ``lease_ttl_s``), so a sensor's readings are scored in order, by one process,
against one copy of its model. Workers heartbeat in ``workers`` and each takes a fair share
of the partitions: a new worker gets some, a stopped one hands its share over at once, and a
dead one's leases expire and are taken over.

Owning a partition:

1. restore: load the partition's checkpoint (its sensors' models, and the stream id they
   reflect) into the shard process, then replay the entries acknowledged since, so the
   models are exactly where the previous owner left them;
2. claim the entries the previous owner read but never acknowledged (``XAUTOCLAIM``) and
   process them, in order, then read new ones (``XREADGROUP``);
3. for each batch: score in the process pool, then publish the predictions and acknowledge
   the entries in one Lua script fenced by the lease, so a batch is published exactly once
   even if its owner dies half-way or was presumed dead;
4. every ``checkpoint_interval_s``: save the models and trim the stream up to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import pickle
import secrets
import signal
import socket
import time
from concurrent.futures import BrokenExecutor
from typing import Any

from redis.exceptions import RedisError, ResponseError

from app.backends.redis import GROUP, RedisBackend, decode_readings
from app.config import Settings
from app.pipeline.batcher import WORKER_DIED, error_predictions
from app.pipeline.inference import (
    BatchResult,
    ShardPool,
    TrainingJob,
    drop_partition,
    export_partition_states,
    import_states,
    run_batch,
)
from app.pipeline.publish import batch_bodies, encode_batch
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

Entry = tuple[bytes, dict[bytes, bytes]]


class LeaseLost(Exception):
    """Another worker owns the partition now."""


class Worker:
    """One ``sensorcast worker`` process: a process pool and the partitions it owns."""

    def __init__(self, settings: Settings, backend: RedisBackend) -> None:
        self.settings = settings
        self.backend = backend
        # redis-py types replies as unions of every shape; this module knows the shapes.
        self.redis: Any = backend.client
        self.id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.partitions = settings.partitions
        self.lease_ms = int(settings.lease_ttl_s * 1000)
        self.pool = ShardPool(
            settings.workers,
            settings.trainer_workers,
            settings.model,
            settings.pool_start_timeout_s,
            options=settings.model_options(),
        )
        self.owned: dict[int, asyncio.Task[None]] = {}
        self._releasing: set[int] = set()
        self._installs: dict[int, list[tuple[str, Any]]] = {}
        self._restored: dict[int, int] = {}
        self._shard_locks = [asyncio.Lock() for _ in range(settings.workers)]
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)
        self.processed = 0

    def key(self, name: str) -> str:
        return self.backend.key(name)

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Serve partitions until ``stop`` is set, then hand them over and return."""
        await self.pool.start()
        log.info("worker %s: pool ready, %d shards", self.id, self.pool.size)
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
            await self.pool.stop()

    async def _balance(self) -> None:
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
            renewed = await self._renew(
                keys=[self.key(f"lease:{p}")], args=[self.id, self.lease_ms]
            )
            if not renewed:
                log.warning("worker %s: lost the lease of partition %d", self.id, p)
                task.cancel()
                self.owned.pop(p)
        active = [p for p in self.owned if p not in self._releasing]
        if len(active) > share:
            for p in active[share:]:
                self._releasing.add(p)
        elif len(active) < share:
            offset = int.from_bytes(self.id.encode()[-2:], "big")
            for i in range(self.partitions):
                if len(self.owned) - len(self._releasing) >= share:
                    break
                p = (offset + i) % self.partitions
                if p in self.owned:
                    continue
                taken = await self.redis.set(
                    self.key(f"lease:{p}"), self.id, nx=True, px=self.lease_ms
                )
                if taken:
                    self.owned[p] = asyncio.create_task(self._serve(p), name=f"partition-{p}")

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
        shard = p % self.pool.size
        stream = self.key(f"readings:{p}")
        log.info("worker %s: took partition %d", self.id, p)
        try:
            await self._ensure_group(stream)
            self._restored.pop(p, None)
            await self._ensure_restored(p, shard)
            last_checkpoint = time.monotonic()
            since_checkpoint = 0
            last_id: bytes | None = None
            # Entries read by a previous owner and never acknowledged come first, in order.
            start: bytes | str = "0-0"
            while True:
                reply = await self.redis.xautoclaim(
                    stream, GROUP, self.id, min_idle_time=0, start_id=start, count=16
                )
                start, entries = reply[0], reply[1]
                if entries:
                    last_id = await self._process(p, shard, entries)
                    since_checkpoint += 1
                if start in (b"0-0", "0-0"):
                    break
            while p not in self._releasing:
                reply = await self.redis.xreadgroup(
                    GROUP, self.id, {stream: ">"}, count=16, block=200
                )
                entries = reply[0][1] if reply else []
                if entries or self._installs.get(p):
                    last_id = await self._process(p, shard, entries) or last_id
                    since_checkpoint += 1
                interval = time.monotonic() - last_checkpoint
                if last_id and since_checkpoint and interval >= self.settings.checkpoint_interval_s:
                    await self._checkpoint(p, shard, last_id)
                    last_checkpoint, since_checkpoint = time.monotonic(), 0
            if last_id and since_checkpoint:
                await self._checkpoint(p, shard, last_id)
        except LeaseLost:
            log.warning("worker %s: partition %d taken over", self.id, p)
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError) as exc:
            log.warning("worker %s: partition %d stopped: %s", self.id, p, exc)
        finally:
            self._releasing.discard(p)
            with contextlib.suppress(Exception):
                await self.pool.submit(shard, drop_partition, p, self.partitions)
            with contextlib.suppress(RedisError, OSError):
                await self._release(keys=[self.key(f"lease:{p}")], args=[self.id])
            self.owned.pop(p, None)

    async def _ensure_group(self, stream: str) -> None:
        try:
            await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _process(self, p: int, shard: int, entries: list[Entry]) -> bytes | None:
        readings: list[Reading] = []
        ids: list[bytes] = []
        for entry_id, fields in entries:
            ids.append(entry_id)
            if fields:  # a claimed entry that was trimmed meanwhile has no fields
                readings.extend(decode_readings(fields[b"r"], fields[b"m"]))
        installs = self._installs.pop(p, [])
        result = await self._run(p, shard, readings, installs)
        bodies = batch_bodies(result.predictions, result.swaps)
        first = await self.backend.publish_and_ack(
            encode_batch(bodies), len(bodies), p, self.id, len(readings), ids
        )
        if first < 0:
            raise LeaseLost
        self.processed += len(readings)
        for job in result.jobs:
            self._train(p, job)
        return ids[-1] if ids else None

    async def _run(
        self, p: int, shard: int, readings: list[Reading], installs: list[tuple[str, Any]]
    ) -> BatchResult:
        """Score a batch; a dead shard process is rebuilt and the batch tried once more."""
        for _attempt in range(2):
            await self._ensure_restored(p, shard)
            generation = self.pool.generation[shard]
            try:
                result: BatchResult = await self.pool.submit(shard, run_batch, readings, installs)
                return result
            except BrokenExecutor:
                async with self._shard_locks[shard]:
                    if self.pool.generation[shard] == generation:
                        await self.pool.rebuild(shard)
        log.error("partition %d: a batch killed its worker twice; answering with errors", p)
        return BatchResult(error_predictions(readings, WORKER_DIED), [], [])

    async def _ensure_restored(self, p: int, shard: int) -> None:
        """Bring the shard's copy of the partition's models up to date after a (re)start."""
        if self._restored.get(p) == self.pool.generation[shard]:
            return
        generation = self.pool.generation[shard]
        stream = self.key(f"readings:{p}")
        checkpoint = await self.redis.hgetall(self.key(f"ckpt:{p}"))
        after = checkpoint.get(b"id", b"0-0")
        if b"states" in checkpoint:
            await self.pool.submit(shard, import_states, pickle.loads(checkpoint[b"states"]))
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
        while True:
            entries = await self.redis.xrange(stream, min=lower, max=delivered, count=256)
            if not entries or delivered == b"0-0":
                break
            readings: list[Reading] = []
            for entry_id, fields in entries:
                if entry_id not in pending and fields:
                    readings.extend(decode_readings(fields[b"r"], fields[b"m"]))
            if readings:
                await self.pool.submit(shard, run_batch, readings, [], True)
                replayed += len(readings)
            lower = b"(" + entries[-1][0]
        self._restored[p] = generation
        if replayed or b"states" in checkpoint:
            log.info("partition %d: restored (%d readings replayed)", p, replayed)

    async def _checkpoint(self, p: int, shard: int, last_id: bytes) -> None:
        states = await self.pool.submit(shard, export_partition_states, p, self.partitions)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                self.key(f"ckpt:{p}"), mapping={"id": last_id, "states": pickle.dumps(states)}
            )
            pipe.xtrim(self.key(f"readings:{p}"), minid=last_id, approximate=False)
            await pipe.execute()

    def _train(self, p: int, job: TrainingJob) -> None:
        def deliver(fitted: Any) -> None:
            if p in self.owned:  # the partition may have moved to another worker meanwhile
                self._installs.setdefault(p, []).append((job.sensor_id, fitted))

        self.pool.train(job, deliver)


async def run_worker(settings: Settings) -> int:
    """Run the worker role until SIGTERM/SIGINT; hand partitions over, then return 0."""
    backend = RedisBackend(settings.backend, timeout_s=settings.redis_timeout_s)
    await backend.connect()
    worker = Worker(settings, backend)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await worker.run(stop)
    finally:
        await backend.disconnect()
    log.info("worker %s: stopped after %d readings", worker.id, worker.processed)
    return 0
