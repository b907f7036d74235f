"""No accepted reading lost: worker crashes, poison readings, graceful shutdown under load."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.conftest import Server, collect, connect, receive_json, running
from tests.models import POISON


class Load:
    """Posts batches of uniquely numbered readings until stopped; remembers what was accepted.

    A request that fails in transport (connection refused or reset, a timeout) fails the run,
    so a service that crashed cannot pass for one that refused, unless the test said the
    server is going away (:meth:`server_leaving`); those are counted in
    :attr:`transport_errors`.
    """

    def __init__(
        self, client: httpx.AsyncClient, sensors: int = 40, batch: int = 200, prefix: str = "s"
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.sensors = sensors
        self.batch = batch
        self.accepted: list[int] = []
        self.refused = 0
        self.transport_errors = 0
        self._leaving = False
        self.statuses: dict[int, int] = defaultdict(int)
        self._next = 0
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    def server_leaving(self) -> None:
        """From now on the server may close connections: transport errors are expected."""
        self._leaving = True

    async def run(self, pause_s: float = 0.005) -> None:
        while not self._stop.is_set():
            ids = list(range(self._next, self._next + self.batch))
            self._next += self.batch
            body = [
                {
                    "sensor_id": f"{self.prefix}{i % self.sensors}",
                    "value": float(i % 7),
                    "id": str(i),
                }
                for i in ids
            ]
            try:
                r = await self.client.post("/v1/readings", json=body)
            except httpx.TransportError:
                if not self._leaving:
                    raise
                self.transport_errors += 1
                await asyncio.sleep(0.05)
                continue
            self.statuses[r.status_code] += 1
            if r.status_code == 202:
                assert r.json() == {"accepted": len(ids), "duplicates": 0}
                self.accepted.extend(ids)
            else:
                assert r.status_code == 503, r.text
                assert r.headers.get("retry-after")
                self.refused += 1
            await asyncio.sleep(pause_s)


class Receiver:
    """Collects every prediction of one subscriber (batched frames unpacked)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.predictions: list[dict[str, Any]] = []
        self.lagged = 0
        """Messages the server dropped for this subscriber (it fell behind)."""
        self.close_code: int | None = None
        self._arrived = asyncio.Event()

    async def run(self) -> None:
        try:
            async for raw in self.ws:
                message = json.loads(raw)
                items = message["items"] if message["type"] == "predictions" else [message]
                self.predictions.extend(m for m in items if m["type"] == "prediction")
                self.lagged += sum(m["dropped"] for m in items if m["type"] == "lagged")
                self._arrived.set()
        except ConnectionClosed:
            pass
        rcvd = self.ws.protocol.close_rcvd
        self.close_code = rcvd.code if rcvd is not None else None

    async def wait_for(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.predictions) < count and (left := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)


UNBOUNDED = "10000000"
"""``subscriber_queue_frames`` for a test's own subscriber, which shares its process with the
load it measures: falling behind the service now and then must not cost it frames (the
slow-client policy has tests of its own)."""


def check_exactly_once_in_order(accepted: list[int], predictions: list[dict[str, Any]]) -> None:
    ids = [int(p["id"]) for p in predictions]
    assert len(ids) == len(set(ids)), "a reading was predicted twice"
    missing = set(accepted) - set(ids)
    assert not missing, f"{len(missing)} accepted readings never predicted"
    assert set(ids) == set(accepted)
    per_sensor: dict[str, list[int]] = defaultdict(list)
    for p in predictions:
        per_sensor[p["sensor_id"]].append(int(p["id"]))
    for sensor, seen in per_sensor.items():
        assert seen == sorted(seen), f"{sensor}: predictions out of order"


async def readyz(client: httpx.AsyncClient) -> httpx.Response:
    return await client.get("/readyz")


async def test_killed_worker_is_rebuilt_and_nothing_accepted_is_lost(server_factory) -> None:
    """SIGKILL a shard worker under load: accepted == predicted, once each, in order."""
    srv: Server = server_factory(checkpoint_interval_s="0.5", subscriber_queue_frames=UNBOUNDED)
    async with (
        httpx.AsyncClient(base_url=srv.url, timeout=30) as client,
        connect(f"{srv.ws_url}?batch=true") as ws,
    ):
        await receive_json(ws)
        before = (await readyz(client)).json()["pool"]
        load, receiver = Load(client), Receiver(ws)
        tasks = [asyncio.create_task(load.run()), asyncio.create_task(receiver.run())]
        await asyncio.sleep(2.0)
        victim = before["shard_pids"][0]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        saw_not_ready = False
        while True:
            r = await readyz(client)
            if r.status_code == 503:
                saw_not_ready = True
            elif r.json()["pool"]["rebuilds"] >= 1:
                break
            assert time.monotonic() - killed_at < 30, "never ready again"
            await asyncio.sleep(0.01)
        recovery_s = time.monotonic() - killed_at
        await asyncio.sleep(1.5)
        load.stop()
        await tasks[0]
        await receiver.wait_for(len(load.accepted), timeout_s=30)
        after = r.json()["pool"]
        tasks[1].cancel()
    in_flight = [line for line in srv.log().splitlines() if "in flight" in line]
    print(
        f"\nworker kill -> ready in {recovery_s * 1000:.0f} ms "
        f"(503 seen: {saw_not_ready}); {len(load.accepted)} accepted, "
        f"{load.refused} refused requests; {in_flight[-1] if in_flight else ''}"
    )
    assert after["shard_pids"][0] != victim and after["rebuilds"] == 1
    assert receiver.lagged == 0, "the test's subscriber fell behind"
    check_exactly_once_in_order(load.accepted, receiver.predictions)
    # The sensors' models were restored, not restarted: no sensor went back to warming up.
    seen_ok: set[str] = set()
    for p in receiver.predictions:
        if p["status"] == "ok":
            seen_ok.add(p["sensor_id"])
        elif p["sensor_id"] in seen_ok:
            raise AssertionError(f"{p['sensor_id']} went back to {p['status']} after recovery")


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_poison_reading_gets_an_error_and_the_rest_are_predicted(
    backend: str, tmp_path: Path
) -> None:
    """A reading that kills its model process every time gets status error, on either
    topology; its neighbours in the same batch are predicted."""
    env = {"SENSORCAST_MODEL": "tests.models:Poisoned", "SENSORCAST_WORKERS": "1"}
    env = {**env, "SENSORCAST_PARTITIONS": "2"} if backend == "redis" else env
    with running(backend, tmp_path, env) as srv:
        body = [{"sensor_id": f"p{i % 5}", "value": float(i), "id": str(i)} for i in range(300)]
        body[137]["value"] = POISON
        async with (
            httpx.AsyncClient(base_url=srv.url, timeout=30) as client,
            connect(srv.ws_url) as ws,
        ):
            await receive_json(ws)
            r = await client.post("/v1/readings", json=body)
            assert r.status_code == 202
            got = await collect(ws, 300, timeout_s=60)
            ready = await readyz(client)
    by_id = {int(p["id"]): p for p in got}
    assert sorted(by_id) == list(range(300))
    assert by_id[137]["status"] == "error"
    assert "model process died" in by_id[137]["reason"]
    assert all(p["status"] != "error" for i, p in by_id.items() if i != 137)
    assert ready.status_code == 200
    if backend == "memory":
        assert ready.json()["pool"]["rebuilds"] >= 2


async def test_sigterm_under_load_delivers_every_accepted_reading(server_factory) -> None:
    """SIGTERM under load: 503 for new readings, every accepted one delivered, 1001, exit 0."""
    srv: Server = server_factory(subscriber_queue_frames=UNBOUNDED)
    async with (
        httpx.AsyncClient(base_url=srv.url, timeout=30) as client,
        connect(f"{srv.ws_url}?batch=true") as ws,
    ):
        await receive_json(ws)
        load, receiver = Load(client, batch=500), Receiver(ws)
        tasks = [asyncio.create_task(load.run(0.0)), asyncio.create_task(receiver.run())]
        await asyncio.sleep(1.5)
        load.server_leaving()
        srv.proc.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        await asyncio.wait_for(tasks[1], 60)  # ends when the server closes the socket
        load.stop()
        await tasks[0]
        code = await asyncio.to_thread(srv.proc.wait, 60)
    print(
        f"\nSIGTERM -> exit in {time.monotonic() - stopped_at:.2f} s; "
        f"{len(load.accepted)} accepted, statuses {dict(load.statuses)}, "
        f"{load.transport_errors} requests after the server closed, "
        f"{receiver.lagged} dropped for the subscriber"
    )
    assert receiver.close_code == 1001
    assert code == 0
    assert len(load.accepted) > 0
    assert receiver.lagged == 0, "the test's subscriber fell behind"
    check_exactly_once_in_order(load.accepted, receiver.predictions)


async def test_workers_never_outlive_a_killed_service(server_factory) -> None:
    """SIGKILL the service (after one model process was replaced): its model processes exit
    by themselves."""
    srv: Server = server_factory()
    async with httpx.AsyncClient(base_url=srv.url) as client:
        first = (await readyz(client)).json()["pool"]["shard_pids"][0]
        os.kill(first, signal.SIGKILL)
        # A batch finds the dead worker and the shard is rebuilt.
        while (r := await readyz(client)).status_code != 200 or r.json()["pool"]["rebuilds"] < 1:
            await client.post(
                "/v1/readings", json=[{"sensor_id": f"k{i}", "value": 1} for i in range(50)]
            )
            await asyncio.sleep(0.05)
        pool = r.json()["pool"]
    pids = pool["shard_pids"]
    srv.stop(signal.SIGKILL)
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        alive = [pid for pid in pids if _alive(pid)]
    assert not alive, f"workers {alive} outlived the service"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"
