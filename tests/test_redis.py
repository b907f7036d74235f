"""Scale-out on Redis: two API replicas and two workers on one real redis-server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from app import scheduling
from tests.conftest import (
    RedisServer,
    Server,
    collect,
    connect,
    free_port,
    receive_json,
    slice_us_of,
    start_server,
    start_worker,
    stop_process,
)
from tests.test_recovery import Load, Receiver, check_exactly_once_in_order


class Topology:
    """``apis`` API replicas and ``workers`` workers sharing one redis-server."""

    def __init__(self, tmp: Path, redis: RedisServer, apis: int = 2, workers: int = 2) -> None:
        self.env = {"SENSORCAST_BACKEND": redis.url, "SENSORCAST_CHECKPOINT_INTERVAL_S": "0.5"}
        self.tmp = tmp
        self.workers: list[subprocess.Popen[bytes]] = [
            start_worker(tmp, self.env) for _ in range(workers)
        ]
        self.apis: list[Server] = [start_server(tmp, self.env) for _ in range(apis)]

    def stop(self) -> None:
        for api in self.apis:
            api.stop(timeout_s=15)
        for worker in self.workers:
            stop_process(worker)


@pytest.fixture
def topology(tmp_path: Path, redis_server: RedisServer) -> Iterator[Topology]:
    topo = Topology(tmp_path, redis_server)
    yield topo
    topo.stop()


async def wait_ready(client: httpx.AsyncClient, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while (await client.get("/readyz")).status_code != 200:
        assert time.monotonic() < deadline, "never ready"
        await asyncio.sleep(0.1)


async def test_readings_posted_to_one_replica_reach_a_subscriber_of_the_other(
    topology: Topology,
) -> None:
    """POST to API 1, subscribe on API 2: every reading exactly once, in per-sensor order."""
    one, two = topology.apis
    async with (
        httpx.AsyncClient(base_url=one.url, timeout=30) as client,
        connect(f"{two.ws_url}?batch=true") as ws,
    ):
        await wait_ready(client)
        await receive_json(ws)
        ids = list(range(3000))
        for start in range(0, 3000, 500):
            body = [
                {"sensor_id": f"r{i % 30}", "value": float(i % 9), "id": str(i)}
                for i in ids[start : start + 500]
            ]
            r = await client.post("/v1/readings", json=body)
            assert r.status_code == 202 and r.json()["accepted"] == 500
        # A retry of an accepted request is acknowledged again, not processed twice.
        retry = await client.post("/v1/readings", json=[{"sensor_id": "r0", "value": 0, "id": "0"}])
        assert retry.json() == {"accepted": 0, "duplicates": 1}
        got = await collect(ws, 3000, timeout_s=60)
    check_exactly_once_in_order(ids, got)
    seqs = [m["seq"] for m in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


async def test_resume_with_since_on_the_other_replica(topology: Topology) -> None:
    """Disconnect from API 1 mid-stream, resume on API 2 with since: nothing lost or repeated."""
    one, two = topology.apis
    async with httpx.AsyncClient(base_url=one.url, timeout=30) as client:
        await wait_ready(client)
        async with connect(one.ws_url) as ws:
            await receive_json(ws)
            body = [{"sensor_id": f"q{i % 5}", "value": 1.0, "id": str(i)} for i in range(400)]
            await client.post("/v1/readings", json=body)
            first = await collect(ws, 150)
        last_seq = first[-1]["seq"]
        body = [{"sensor_id": f"q{i % 5}", "value": 1.0, "id": str(i)} for i in range(400, 600)]
        await client.post("/v1/readings", json=body)
        async with connect(f"{two.ws_url}?since={last_seq}") as ws:
            hello = await receive_json(ws)
            rest = await collect(ws, 450)
    assert hello["type"] == "hello" and hello["epoch"] == first[0]["epoch"]
    check_exactly_once_in_order(list(range(600)), first + rest)


async def test_killed_worker_loses_nothing(topology: Topology) -> None:
    """SIGKILL one of two workers under load: accepted == predicted, no duplicates."""
    one, two = topology.apis
    async with (
        httpx.AsyncClient(base_url=one.url, timeout=30) as client,
        connect(f"{two.ws_url}?batch=true") as ws,
    ):
        await wait_ready(client)
        await receive_json(ws)
        load, receiver = Load(client, batch=200), Receiver(ws)
        tasks = [asyncio.create_task(load.run(0.01)), asyncio.create_task(receiver.run())]
        await asyncio.sleep(2.0)
        topology.workers[0].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        await asyncio.sleep(4.0)  # past the 2 s lease: the other worker takes over
        load.stop()
        await tasks[0]
        await receiver.wait_for(len(load.accepted), timeout_s=60)
        caught_up = time.monotonic() - killed_at
        tasks[1].cancel()
    print(f"\n{len(load.accepted)} accepted; all predicted {caught_up:.1f} s after the kill")
    check_exactly_once_in_order(load.accepted, receiver.predictions)


async def test_redis_restart_under_load(topology: Topology, redis_server: RedisServer) -> None:
    """Redis stopped under load: 503 at once, /readyz 503; restarted: every accepted predicted."""
    one, two = topology.apis
    async with (
        httpx.AsyncClient(base_url=one.url, timeout=30) as client,
        connect(f"{two.ws_url}?batch=true") as ws,
    ):
        await wait_ready(client)
        await receive_json(ws)
        load, receiver = Load(client, batch=100), Receiver(ws)
        tasks = [asyncio.create_task(load.run(0.01)), asyncio.create_task(receiver.run())]
        await asyncio.sleep(1.5)
        redis_server.stop()
        start = time.monotonic()
        r = await client.post("/v1/readings", json={"sensor_id": "x", "value": 1})
        refused_in = time.monotonic() - start
        assert r.status_code == 503 and r.headers["retry-after"]
        assert (await client.get("/readyz")).status_code == 503
        await asyncio.sleep(1.0)
        redis_server.start()
        await wait_ready(client)
        await asyncio.sleep(1.5)
        load.stop()
        await tasks[0]
        await receiver.wait_for(len(load.accepted), timeout_s=60)
        tasks[1].cancel()
    print(f"\nrefused in {refused_in * 1000:.0f} ms while Redis was down; {dict(load.statuses)}")
    assert refused_in < 3.0
    assert load.statuses[503] > 0
    check_exactly_once_in_order(load.accepted, receiver.predictions)


async def test_a_worker_serves_its_model_stage_metrics(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """``sensorcast worker --metrics-port``: /metrics carries the same model-stage figures as
    the embedded service (batches, model time, fits, latency, healthy processes)."""
    port = free_port()
    env = {"SENSORCAST_BACKEND": redis_server.url, "SENSORCAST_METRICS_PORT": str(port)}
    worker = start_worker(tmp_path, {**env, "SENSORCAST_WORKERS": "2"})
    srv = start_server(tmp_path, {"SENSORCAST_BACKEND": redis_server.url})
    try:
        async with (
            httpx.AsyncClient(base_url=srv.url, timeout=30) as client,
            connect(srv.ws_url) as ws,
        ):
            await wait_ready(client)
            await receive_json(ws)
            body = [{"sensor_id": f"m{i % 4}", "value": float(i % 5)} for i in range(400)]
            assert (await client.post("/v1/readings", json=body)).status_code == 202
            await collect(ws, 400)
            scrape = await client.get(f"http://127.0.0.1:{port}/metrics")
            health = await client.get(f"http://127.0.0.1:{port}/healthz")
    finally:
        srv.stop()
        stop_process(worker)
    assert scrape.status_code == 200 and health.status_code == 200
    figures = {
        line.split(" ")[0]: float(line.split(" ")[-1])
        for line in scrape.text.splitlines()
        if line and not line.startswith("#")
    }
    assert sum(v for k, v in figures.items() if k.startswith("sensorcast_batches_total")) >= 1
    assert figures["sensorcast_shards_healthy"] == 2
    assert figures["sensorcast_model_fit_seconds_count"] >= 4  # each sensor's first fit
    assert figures["sensorcast_e2e_latency_seconds_count"] >= 1
    assert figures["sensorcast_published_messages_total"] >= 400


def test_a_worker_and_its_model_processes_run_at_lower_priorities(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """``worker_nice`` lowers a worker's priority (its API replicas' loops come first on a
    shared machine), and ``model_nice`` its model processes' further."""
    base = os.getpriority(os.PRIO_PROCESS, 0)
    env = {
        "SENSORCAST_BACKEND": redis_server.url,
        "SENSORCAST_WORKER_NICE": "3",
        "SENSORCAST_MODEL_NICE": "2",
    }
    worker = start_worker(tmp_path, {**env, "SENSORCAST_WORKERS": "2"})
    try:
        proc = psutil.Process(worker.pid)
        # The model processes are forked by the pool's fork server, the worker's child.
        deadline = time.monotonic() + 60
        while len(models := _grandchildren(proc)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(models) == 2, "the worker started its two model processes"
        assert proc.nice() == min(19, base + 3)
        # A model process lowers its priority in the pool's initializer, a moment after it
        # appears: wait for that, bounded, rather than read it while it may not have run yet.
        want = [min(19, base + 5)] * 2
        while _nices(models) != want and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _nices(models) == want
        if scheduling.thread_slice_us() is not None:
            # The worker's event loop runs on a short time slice (loop_slice_us); the
            # model processes on the kernel's default.
            assert slice_us_of(worker.pid) == 100
            assert {slice_us_of(m.pid) for m in models} == {scheduling.thread_slice_us()}
    finally:
        stop_process(worker)


def _nices(procs: list[psutil.Process]) -> list[int]:
    return [p.nice() for p in procs]


def _grandchildren(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [g for child in proc.children() for g in child.children()]
    except psutil.NoSuchProcess:
        return []
