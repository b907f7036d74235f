"""The Redis backend: durable ingestion on Streams, numbered fan-out, partition leases.

Keys, all under a prefix (``sensorcast:`` by default):

- ``readings:{p}``: a stream per partition; a sensor's readings always go to the same
  partition (crc32 of its id), so per-sensor order holds. One entry per request and
  partition: the readings packed with msgpack, and a mask of the ones that were duplicates.
- ``backlog:{p}``: readings accepted and not yet predicted; ingestion refuses (503) a request
  that would push a partition past ``queue_max_readings``.
- ``dedup:{sensor}|{id}``: remembered for ``dedup_window_s``.
- ``predictions``: a capped stream of published batches, each with ``s`` (its first seq),
  ``n`` (its message count) and ``b`` (the bodies). Every API replica reads it.
- ``seq``, ``epoch``: the numbering. ``epoch`` is bound to the primary's replication id
  (``INFO replication`` ``master_replid``): a Redis that lost its data, restarted, or a replica
  promoted by Sentinel makes a new one, since the numbering may have lost its tail there. The
  scripts that number messages check it and stamp it on each batch (``e``), so a reader sees
  the change at the first batch the new primary numbered.
- ``writes``: bumped after each admission so that ``WAIT`` covers every earlier write, the
  first attempt of a retried request included.
- ``lease:{p}``, ``workers``, ``ckpt:{p}``, ``models:{p}``: which worker owns which
  partition, who is alive, each partition's model checkpoint, and the models of its sensors
  evicted as idle (see ``app/worker.py``).

Every write that must be whole is a Lua script, so it is atomic: a request is admitted whole or
not at all, and a batch's predictions are numbered, appended and acknowledged together.

URLs: ``redis://host:port/db`` (``rediss://`` with TLS), or
``redis+sentinel://host1:26379,host2:26379/service/db``: the Sentinels are asked for the
primary of ``service``; a failover is followed without a restart (calls during it fail, the
API answers 503 with ``Retry-After`` and the workers retry with backoff). With
``min_replicas`` above 0 each admission and each publish-and-acknowledge is followed by
``WAIT min_replicas replica_timeout_ms`` on the same connection: a request is answered 202 only
once that many replicas hold it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, NamedTuple, cast
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from app.backends.base import Numbered
from app.pipeline.routing import split_by_shard
from app.pipeline.wire import decode_readings, encode_readings
from app.schemas import Reading

log = logging.getLogger(__name__)

GROUP = "workers"
PREDICTIONS_MAXLEN = 100_000
"""Batches kept in the predictions stream (approximate trimming)."""

# KEYS: none (single-node Redis); ARGV: prefix, ttl_s, capacity, nchunks,
# then per chunk: partition, payload, nreadings, keys: "" when no reading has an id, else
# one line per reading, its dedup key or "" (sensor ids and reading ids hold no newline).
# Returns {accepted, duplicates} or {-1, 0} when a partition is full.
_INGEST = """
local prefix, ttl, cap, nchunks = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local i = 5
local chunks, seen, fresh_keys = {}, {}, {}
local total = 0
for c = 1, nchunks do
  local p, payload, n, keys = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
  i = i + 4
  local mask, fresh = nil, 0
  if keys == '' then
    mask, fresh = string.rep('0', n), n
  else
    local bits = {}
    for key in string.gmatch(keys .. '\\n', '([^\\n]*)\\n') do
      local dup = false
      if key ~= '' then
        if seen[key] or redis.call('EXISTS', prefix .. 'dedup:' .. key) == 1 then
          dup = true
        else
          fresh_keys[#fresh_keys + 1] = key
        end
        seen[key] = true
      end
      if dup then bits[#bits + 1] = '1' else bits[#bits + 1] = '0'; fresh = fresh + 1 end
    end
    mask = table.concat(bits)
  end
  total = total + n
  chunks[c] = {p, payload, mask, fresh}
end
for c = 1, nchunks do
  local ch = chunks[c]
  local backlog = tonumber(redis.call('GET', prefix .. 'backlog:' .. ch[1]) or '0')
  if ch[4] > 0 and backlog + ch[4] > cap then return {-1, 0} end
end
if ttl > 0 then
  for _, key in ipairs(fresh_keys) do
    redis.call('SET', prefix .. 'dedup:' .. key, '1', 'EX', ttl)
  end
end
local accepted = 0
for c = 1, nchunks do
  local ch = chunks[c]
  if ch[4] > 0 then
    redis.call('XADD', prefix .. 'readings:' .. ch[1], '*', 'r', ch[2], 'm', ch[3])
    redis.call('INCRBY', prefix .. 'backlog:' .. ch[1], ch[4])
    accepted = accepted + ch[4]
  end
end
return {accepted, total - accepted}
"""

# The epoch stays while the primary's replication id is its suffix; otherwise a new one is
# made from ``fresh`` (a promoted replica, a restarted or emptied Redis): its ``seq`` may lack
# the old numbering's tail. Shared by the scripts that number messages, so every published
# batch carries the epoch of the primary that numbered it.
_CURRENT_EPOCH = """
local function current_epoch(prefix, fresh)
  local info = redis.call('INFO', 'replication')
  local suffix = '.' .. string.sub(string.match(info, 'master_replid:(%w+)') or '', 1, 12)
  local e = redis.call('GET', prefix .. 'epoch')
  if e and string.sub(e, -#suffix) == suffix then return e end
  e = fresh .. suffix
  redis.call('SET', prefix .. 'epoch', e)
  return e
end
"""

# ARGV: prefix, fresh epoch prefix. Returns the epoch.
_EPOCH = _CURRENT_EPOCH + "return current_epoch(ARGV[1], ARGV[2])"

# ARGV: prefix, maxlen, count, payload, fresh epoch prefix. Returns the first seq.
_PUBLISH = (
    _CURRENT_EPOCH
    + """
local prefix, maxlen, count = ARGV[1], ARGV[2], tonumber(ARGV[3])
local epoch = current_epoch(prefix, ARGV[5])
local first = redis.call('INCRBY', prefix .. 'seq', count) - count + 1
redis.call('XADD', prefix .. 'predictions', 'MAXLEN', '~', maxlen, '*',
           's', first, 'n', count, 'b', ARGV[4], 'e', epoch)
return first
"""
)

# Publish a worker's batch and acknowledge its readings, fenced by the partition lease.
# ARGV: prefix, maxlen, count, payload, partition, owner, nreadings, fresh epoch prefix, id...
# Returns the first seq (0 when nothing was published), or -1 when the lease is not ours.
_PUBLISH_ACK = (
    _CURRENT_EPOCH
    + """
local prefix, maxlen, count, p, owner = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[5], ARGV[6]
if redis.call('GET', prefix .. 'lease:' .. p) ~= owner then return -1 end
local first = 0
if count > 0 then
  local epoch = current_epoch(prefix, ARGV[8])
  first = redis.call('INCRBY', prefix .. 'seq', count) - count + 1
  redis.call('XADD', prefix .. 'predictions', 'MAXLEN', '~', maxlen, '*',
             's', first, 'n', count, 'b', ARGV[4], 'e', epoch)
end
local ids = {}
for k = 9, #ARGV do ids[#ids + 1] = ARGV[k] end
if #ids > 0 then
  redis.call('XACK', prefix .. 'readings:' .. p, 'workers', unpack(ids))
end
redis.call('DECRBY', prefix .. 'backlog:' .. p, tonumber(ARGV[7]))
return first
"""
)


def entry_readings(fields: dict[bytes, bytes]) -> list[Reading]:
    """The readings of a stream entry, less the ones that were duplicates.

    An entry holds one request's readings for one partition (``r``, packed as
    :func:`app.pipeline.wire.encode_readings` packs a batch) and a mask (``m``) of the ones
    already accepted before (``1``).
    """
    readings = decode_readings(fields[b"r"])
    mask = fields[b"m"]
    if b"1" not in mask:
        return readings
    keep = ord("0")
    return [r for r, flag in zip(readings, mask, strict=True) if flag == keep]


SENTINEL_PORT = 26379


class SentinelAddress(NamedTuple):
    sentinels: list[tuple[str, int]]
    service: str
    db: int
    password: str | None


def sentinel_address(url: str) -> SentinelAddress:
    """The parts of a ``redis+sentinel://[:PASSWORD@]HOST[:PORT],.../SERVICE[/DB]`` URL.

    The password, if any, is the Redis servers' (the Sentinels are asked without one).

    Raises:
        ValueError: the URL names no Sentinel or no service.

    Examples:
        >>> sentinel_address("redis+sentinel://a:26380,b/mymaster/2")
        SentinelAddress(sentinels=[('a', 26380), ('b', 26379)], service='mymaster', db=2, \
password=None)
    """
    rest = url.partition("://")[2]
    netloc, _, path = rest.partition("/")
    password = None
    if "@" in netloc:
        auth, _, netloc = netloc.rpartition("@")
        password = unquote(auth.partition(":")[2]) or None
    sentinels = []
    for item in netloc.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep:
            host, port = port, str(SENTINEL_PORT)
        if not host or not port.isdigit():
            raise ValueError(f"{url!r}: {item!r} is not HOST[:PORT]")
        sentinels.append((host.strip("[]"), int(port)))
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError(f"{url!r}: expected .../SERVICE_NAME[/DB] after the Sentinels")
    return SentinelAddress(sentinels, parts[0], int(parts[1]) if len(parts) == 2 else 0, password)


class RedisUnavailable(Exception):
    """Redis did not answer in time."""


class NotReplicated(RedisUnavailable):
    """Fewer replicas than ``min_replicas`` acknowledged a write in time."""


class RedisBackend:
    """The shared backend for API replicas and workers."""

    OPTIONS = ("timeout_s", "min_replicas", "replica_timeout_ms")

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "sensorcast:",
        timeout_s: float = 2.0,
        predictions_maxlen: int = PREDICTIONS_MAXLEN,
        min_replicas: int = 0,
        replica_timeout_ms: int = 500,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.predictions_maxlen = predictions_maxlen
        self.min_replicas = min_replicas
        self.replica_timeout_ms = replica_timeout_ms
        # A call that waits for replicas may take that much longer.
        self.call_timeout_s = timeout_s + (replica_timeout_ms / 1000 if min_replicas else 0)
        self.sentinel: Sentinel | None = None
        self.service = ""
        self.primary: tuple[str, int] | None = None
        """The primary's address as the Sentinels last named it."""
        self.primary_changes = 0
        """How often the Sentinels named another primary (the workers start their partitions
        over on the new one)."""
        self._watch: asyncio.Task[None] | None = None
        connect: Callable[..., aioredis.Redis]
        if url.startswith("redis+sentinel://"):
            address = sentinel_address(url)
            self.service = address.service
            sentinel = self.sentinel = Sentinel(  # type: ignore[no-untyped-call,unused-ignore]
                address.sentinels,
                sentinel_kwargs={"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s},
            )

            def connect(**options: Any) -> aioredis.Redis:
                client = sentinel.master_for(
                    address.service, db=address.db, password=address.password, **options
                )
                return cast(aioredis.Redis, client)
        else:

            def connect(**options: Any) -> aioredis.Redis:
                return aioredis.Redis.from_url(url, **options)

        self.client = connect(
            socket_timeout=self.call_timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
        )
        # Blocking reads hold a connection for up to a second: give them their own.
        self.reader = connect(socket_timeout=timeout_s + 2, socket_connect_timeout=timeout_s)
        self._epoch_script = self.client.register_script(_EPOCH)
        self._ingest = self.client.register_script(_INGEST)
        self._publish = self.client.register_script(_PUBLISH)
        self._publish_ack = self.client.register_script(_PUBLISH_ACK)
        self._epoch: str | None = None
        self._start_ids: dict[str, bytes] = {}

    def key(self, name: str) -> str:
        return self.prefix + name

    async def connect(self) -> None:
        # Redis may not be up yet (compose starts services together): don't fail start-up,
        # readiness says no until it answers.
        if self.sentinel is not None and self._watch is None:
            self._watch = asyncio.create_task(self._follow_primary(), name="redis-primary")
        try:
            await self.epoch()
        except RedisError as exc:
            log.warning("Redis at %s not reachable yet: %s", self.url, exc)

    async def disconnect(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        await self.client.aclose()
        await self.reader.aclose()
        if self.sentinel is not None:
            for sentinel in self.sentinel.sentinels:
                await sentinel.aclose()

    async def _follow_primary(self, period_s: float = 1.0) -> None:
        """Ask the Sentinels for the primary every ``period_s``; when they name another, move
        every connection to it: idle ones now, busy ones when their call returns.

        A connection asks the Sentinels only when it is made. Without this, connections to a
        primary demoted by a requested failover (or cut off by a partition) would keep
        writing to it until it turns into a replica, which Sentinel does only seconds later:
        writes that the new primary never sees.
        """
        assert self.sentinel is not None
        while True:
            await asyncio.sleep(period_s)
            try:
                address: tuple[str, int] = await self.sentinel.discover_master(self.service)
            except (RedisError, OSError) as exc:
                log.debug("asking the Sentinels for %s: %s", self.service, exc)
                continue
            if self.primary is not None and address != self.primary:
                log.warning("Redis primary moved from %s:%d to %s:%d", *self.primary, *address)
                for client in (self.client, self.reader):
                    await client.connection_pool.run_proactive_reconnect()
                self.primary_changes += 1
            self.primary = address

    async def ping(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.client.ping(), self.timeout_s))
        except (RedisError, OSError, TimeoutError):
            return False

    async def epoch(self) -> str:
        """The numbering's identity, bound to the primary's replication id: a promoted replica,
        a restarted or emptied Redis get a new one (their ``seq`` may have lost its tail)."""
        value = await self._epoch_script(args=[self.prefix, _fresh_epoch()])
        self._epoch = value.decode() if isinstance(value, bytes) else str(value)
        return self._epoch

    async def publish(self, channel: str, payload: bytes, count: int) -> int:
        args: list[Any] = [self.prefix, self.predictions_maxlen, count, payload, _fresh_epoch()]
        return int(await self._publish(args=args))

    async def replicated(self) -> bool:
        """True once ``min_replicas`` replicas hold every write made so far (a fresh write
        and ``WAIT`` on one connection); always True without ``min_replicas``."""
        if not self.min_replicas:
            return True
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.incr(self.key("writes"))
            pipe.wait(self.min_replicas, self.replica_timeout_ms)
            _, acked = await pipe.execute()
        return int(acked) >= self.min_replicas

    async def publish_and_ack(
        self,
        payload: bytes,
        count: int,
        partition: int,
        owner: str,
        readings: int,
        entry_ids: Sequence[bytes | str],
    ) -> int:
        """Publish a worker's batch and acknowledge its stream entries, atomically.

        With ``min_replicas``, returns only once that many replicas hold the write: it waits
        for them again and again (with backoff) while they lag, so that nothing built on this
        batch (the next batches, a checkpoint) gets ahead of what a promoted replica would hold.

        Returns the first seq, 0 when the batch had no messages, or -1 when ``owner`` no
        longer holds the partition's lease (nothing was written).

        Raises:
            RedisError, OSError: Redis failed; the batch may or may not have been written.
        """
        args: list[Any] = [
            self.prefix, self.predictions_maxlen, count, payload, partition, owner, readings,
            _fresh_epoch(), *entry_ids,
        ]  # fmt: skip
        if not self.min_replicas:
            return int(await self._publish_ack(args=args))
        async with self.client.pipeline(transaction=False) as pipe:
            await self._publish_ack(args=args, client=pipe)
            pipe.wait(self.min_replicas, self.replica_timeout_ms)
            first, acked = await pipe.execute()
        delay = 0.05
        while int(first) >= 0 and int(acked) < self.min_replicas:
            log.warning(
                "partition %s: %d of %d replicas acknowledged a batch; waiting",
                partition, int(acked), self.min_replicas,
            )  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            acked = self.min_replicas if await self.replicated() else 0
        return int(first)

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[AsyncIterator[Numbered]]:
        stream = self.key(channel)
        last = await self._last_id(stream)
        self._start_ids[channel] = last

        async def payloads() -> AsyncIterator[Numbered]:
            nonlocal last
            delay = 0.1
            while True:
                try:
                    response: Any = await self.reader.xread({stream: last}, count=100, block=1000)
                    delay = 0.1
                except (RedisError, OSError) as exc:
                    log.warning("reading %s: %s; retrying in %.1f s", stream, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                for _stream, entries in response or ():
                    for entry_id, fields in entries:
                        last = entry_id
                        first = int(fields[b"s"])
                        # Each batch carries the epoch of the primary that numbered it: the
                        # first of a new primary announces the renumbering, exactly there.
                        epoch = fields.get(b"e")
                        if epoch is not None and epoch.decode() != self._epoch:
                            log.warning(
                                "epoch changed (%s -> %s): numbering goes on at %d",
                                self._epoch, epoch.decode(), first,
                            )  # fmt: skip
                            self._epoch = epoch.decode()
                            yield 0, b"%s %d" % (epoch, first)
                        yield first, fields[b"b"]

        yield payloads()

    async def recent(self, channel: str, max_messages: int) -> list[Numbered]:
        stream = self.key(channel)
        end = self._start_ids.get(channel) or await self._last_id(stream)
        if end == b"0-0" or max_messages <= 0:
            return []
        out: list[Numbered] = []
        total = 0
        upper: bytes | str = end
        while total < max_messages:
            entries: Any = await self.client.xrevrange(stream, max=upper, min="-", count=200)
            if upper != end:
                entries = [e for e in entries if e[0] != upper]
            if not entries:
                break
            for entry_id, fields in entries:
                out.append((int(fields[b"s"]), fields[b"b"]))
                total += int(fields[b"n"])
                upper = entry_id
            if len(entries) < 199:
                break
        out.reverse()
        return out

    async def live_workers(self, ttl_s: float) -> int:
        """Workers that sent a heartbeat within ``ttl_s``."""
        try:
            since = int((time.time() - ttl_s) * 1000)
            return int(await self.client.zcount(self.key("workers"), since, "+inf"))
        except (RedisError, OSError):
            return 0

    async def _last_id(self, stream: str) -> bytes:
        entries = await self.client.xrevrange(stream, count=1)
        return cast(bytes, entries[0][0]) if entries else b"0-0"

    async def offer(
        self,
        readings: list[Reading],
        *,
        partitions: int,
        capacity: int,
        dedup_ttl_s: float,
    ) -> tuple[int, int] | None:
        """Append a request's readings to their partitions, whole or not at all.

        Returns (accepted, duplicates), or None when a partition has no room.

        Raises:
            RedisUnavailable: Redis did not answer within the timeout.
        """
        chunks = [(p, c) for p, c in enumerate(split_by_shard(readings, partitions)) if c]
        args: list[Any] = [self.prefix, int(dedup_ttl_s), capacity, len(chunks)]
        for p, chunk in chunks:
            # The keys travel as one argument: one per reading would cost the client about
            # a microsecond each to pack, on the event loop, for every reading of a request.
            keys = ""
            if any(r.id is not None for r in chunk):
                keys = "\n".join("" if r.id is None else f"{r.sensor_id}|{r.id}" for r in chunk)
            args += [p, encode_readings(chunk), len(chunk), keys]
        try:
            accepted, duplicates = await asyncio.wait_for(self._admit(args), self.call_timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            raise RedisUnavailable(str(exc) or type(exc).__name__) from None
        if accepted < 0:
            return None
        return int(accepted), int(duplicates)

    async def _admit(self, args: list[Any]) -> tuple[int, int]:
        """Run the admission script; with ``min_replicas``, then a write and ``WAIT`` on the
        same connection (the write makes ``WAIT`` cover an earlier attempt of a retry whose
        readings are all duplicates now).

        Raises:
            NotReplicated: fewer replicas acknowledged in time.
        """
        if not self.min_replicas:
            accepted, duplicates = await self._ingest(args=args)
            return int(accepted), int(duplicates)
        async with self.client.pipeline(transaction=False) as pipe:
            await self._ingest(args=args, client=pipe)
            pipe.incr(self.key("writes"))
            pipe.wait(self.min_replicas, self.replica_timeout_ms)
            (accepted, duplicates), _, acked = await pipe.execute()
        if int(accepted) >= 0 and int(acked) < self.min_replicas:
            raise NotReplicated(f"{int(acked)} of {self.min_replicas} replicas acknowledged")
        return int(accepted), int(duplicates)


def _fresh_epoch() -> str:
    """The first part of a new epoch, should one be made (the replication id follows)."""
    return f"{int(time.time()):x}-{secrets.token_hex(4)}"
