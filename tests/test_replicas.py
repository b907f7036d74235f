"""The replica lifecycle on Redis: retries across API replicas, a late-joining replica, workers
stopped and restarted under load, Redis absent at start. Real redis-server, real processes."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.conftest import (
    RedisServer,
    collect,
    connect,
    receive_json,
    start_server,
    start_worker,
    stop_process,
)
from tests.test_recovery import Load, Receiver, check_exactly_once_in_order
from tests.test_redis import Topology, wait_ready


def _body(ids: range, prefix: str, sensors: int = 20) -> list[dict[str, object]]:
    return [
        {"sensor_id": f"{prefix}{i % sensors}", "value": float(i % 9), "id": str(i)} for i in ids
    ]


async def test_a_retry_sent_to_another_replica_is_predicted_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """First attempt to API A, the retry (same ids) to API B: acknowledged as duplicates,
    one prediction per reading."""
    topo = Topology(tmp_path, redis_server, apis=2, workers=1)
    try:
        await _retry_across_replicas(topo)
    finally:
        topo.stop()


async def _retry_across_replicas(topo: Topology) -> None:
    one, two = topo.apis
    async with (
        httpx.AsyncClient(base_url=one.url, timeout=30) as a,
        httpx.AsyncClient(base_url=two.url, timeout=30) as b,
        connect(f"{one.ws_url}?batch=true") as ws,
    ):
        await wait_ready(a)
        await wait_ready(b)
        await receive_json(ws)
        first = await a.post("/v1/readings", json=_body(range(300), "x"))
        assert first.status_code == 202 and first.json() == {"accepted": 300, "duplicates": 0}
        retry = await b.post("/v1/readings", json=_body(range(300), "x"))
        assert retry.status_code == 202 and retry.json() == {"accepted": 0, "duplicates": 300}
        # A partial retry: the old half is recognised, the new half taken.
        mixed = await b.post("/v1/readings", json=_body(range(150, 450), "x"))
        assert mixed.json() == {"accepted": 150, "duplicates": 150}
        got = await collect(ws, 450, timeout_s=60)
        # Nothing more arrives after the 450: a duplicate would come behind them.
        tail = await b.post("/v1/readings", json=_body(range(450, 451), "x"))
        assert tail.json()["accepted"] == 1
        got += await collect(ws, 1, timeout_s=30)
    check_exactly_once_in_order(list(range(451)), got)


async def test_a_late_joining_replica_serves_since_exactly(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """An API replica started after 600 predictions were published resumes a client from
    any kept ``seq``: exactly the messages after it, in order."""
    topo = Topology(tmp_path, redis_server, apis=1, workers=1)
    try:
        (one,) = topo.apis
        async with httpx.AsyncClient(base_url=one.url, timeout=30) as client:
            await wait_ready(client)
            async with connect(f"{one.ws_url}?batch=true") as ws:
                await receive_json(ws)
                assert (
                    await client.post("/v1/readings", json=_body(range(600), "l"))
                ).status_code == 202
                seen = await collect(ws, 600, timeout_s=60)
        late = start_server(tmp_path, topo.env)
        topo.apis.append(late)
        resume_at = seen[199]["seq"]
        async with connect(f"{late.ws_url}?batch=true&since={resume_at}") as ws:
            hello = await receive_json(ws)
            assert hello["type"] == "hello" and hello["epoch"] == seen[0]["epoch"]
            replayed = await collect(ws, 400, timeout_s=30)
        assert [m["seq"] for m in replayed] == [m["seq"] for m in seen[200:]]
        assert [m["id"] for m in replayed] == [m["id"] for m in seen[200:]]
    finally:
        topo.stop()


async def test_workers_stopped_and_restarted_one_by_one_under_load(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A rolling restart: each of two workers gets SIGTERM under load (handing its partitions
    over) and a successor is started; every accepted reading predicted once, in order."""
    topo = Topology(tmp_path, redis_server, apis=1, workers=2)
    try:
        (api,) = topo.apis
        async with (
            httpx.AsyncClient(base_url=api.url, timeout=30) as client,
            connect(f"{api.ws_url}?batch=true") as ws,
        ):
            await wait_ready(client)
            await receive_json(ws)
            load, receiver = Load(client, batch=100, prefix="w"), Receiver(ws)
            tasks = [asyncio.create_task(load.run(0.01)), asyncio.create_task(receiver.run())]
            for n in range(2):
                await receiver.wait_for(len(load.accepted) + 300, timeout_s=60)
                old = topo.workers[n]
                code = await asyncio.to_thread(stop_process, old, signal.SIGTERM)
                assert code == 0, f"worker {n} exited with {code}"
                topo.workers.append(start_worker(tmp_path, topo.env))
            await receiver.wait_for(len(load.accepted) + 300, timeout_s=60)
            load.stop()
            await tasks[0]
            await receiver.wait_for(len(load.accepted), timeout_s=60)
            tasks[1].cancel()
        print(f"\n{len(load.accepted)} accepted across a rolling restart; {dict(load.statuses)}")
        assert len(load.accepted) > 600
        check_exactly_once_in_order(load.accepted, receiver.predictions)
    finally:
        topo.stop()


async def test_redis_absent_at_start_then_up(tmp_path: Path) -> None:
    """API and worker started before Redis: both start, /readyz answers 503 naming the
    backend, POST 503 with Retry-After; once Redis is up, ready and readings predicted."""
    redis = RedisServer(tmp_path)  # its port chosen, nothing listening yet
    env = {"SENSORCAST_BACKEND": redis.url}
    worker: subprocess.Popen[bytes] = start_worker(tmp_path, env)
    api = start_server(tmp_path, env, ready_path="/healthz")
    try:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 503, ready.text
            refused = await client.post("/v1/readings", json={"sensor_id": "z", "value": 1.0})
            assert refused.status_code == 503 and refused.headers["retry-after"]
            assert worker.poll() is None, "the worker gave up without Redis"
            redis.start()
            started = time.monotonic()
            await wait_ready(client, timeout_s=60)
            ready_in = time.monotonic() - started
            async with connect(f"{api.ws_url}?batch=true") as ws:
                await receive_json(ws)
                r = await client.post("/v1/readings", json=_body(range(50), "z", sensors=5))
                assert r.status_code == 202
                got = await collect(ws, 50, timeout_s=60)
        print(f"\nready {ready_in:.1f} s after Redis came up")
        check_exactly_once_in_order(list(range(50)), got)
    finally:
        api.stop(timeout_s=15)
        stop_process(worker)
        redis.stop()
