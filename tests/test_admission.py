"""Admission under a full pipeline: refused whole with 503, before or after parsing, or with
``admission_wait_ms`` after a bounded wait for room, first come first served."""

from __future__ import annotations

import asyncio
import re
import tracemalloc

import httpx
import pytest

from app.config import Settings
from app.pipeline import wire
from app.pipeline.ingest import Ingestor, Overloaded, RecentIds, ShardQueue
from app.pipeline.routing import split_by_shard
from app.schemas import Reading, parse_json
from bench._workload import Stream, sensor_ids
from tests.conftest import Server, collect, connect, quiet, receive_json


def _readings(sensor: str, n: int) -> list[Reading]:
    return [Reading(sensor, None, float(i), ("value",), (float(i),), 0.0) for i in range(n)]


def _ingestor(capacity: int) -> tuple[Ingestor, ShardQueue]:
    queue = ShardQueue(capacity)
    return Ingestor([queue], RecentIds(window_s=60, max_ids=1000)), queue


@pytest.mark.parametrize(
    ("backend", "default"),
    [("memory://", 100_000), ("redis://127.0.0.1:6379/0", 25_000),
     ("redis+sentinel://127.0.0.1:26379/main", 25_000)],
)  # fmt: skip
def test_the_queue_bound_defaults_by_topology_and_a_set_value_wins(
    backend: str, default: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per shard queue in the service (packed, seconds of work) or per partition stream in
    Redis (16 of them): each topology's own default, unless the setting is given."""
    assert Settings(backend=backend).queue_max_readings == default
    assert Settings(backend=backend, queue_max_readings=500).queue_max_readings == 500
    monkeypatch.setenv("SENSORCAST_BACKEND", backend)
    monkeypatch.setenv("SENSORCAST_QUEUE_MAX_READINGS", "700")
    assert Settings().queue_max_readings == 700


def test_queued_readings_are_packed_and_batches_are_whole_shares_in_order() -> None:
    """Admitted readings wait packed, well under 100 bytes each (measured by tracemalloc:
    what stays allocated once the parsed requests are dropped), and come out as batches of
    whole request shares, in admission order, that unpack to the readings admitted."""
    stream = Stream(sensor_ids(300, prefix="q"))
    bodies = [stream.body(1_000) for _ in range(40)]
    queues = [ShardQueue(10**6) for _ in range(2)]
    ingestor = Ingestor(queues, RecentIds(window_s=60, max_ids=1000))
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for body in bodies:
            assert ingestor.offer(parse_json(body, max_items=10_000)) == (1_000, 0)
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert held / 40_000 < 100, f"{held / 40_000:.0f} bytes a queued reading"

    def fields(r: Reading) -> tuple[object, ...]:
        return r.sensor_id, r.id, r.ts, r.channels, r.values

    for shard, queue in enumerate(queues):
        shares = [split_by_shard(parse_json(b, max_items=10_000), 2)[shard] for b in bodies]
        # Where a share ends, counted in readings from the start of the queue.
        ends, total = set(), 0
        for share in shares:
            total += len(share)
            ends.add(total)
        taken: list[Reading] = []
        while queue.waiting:
            batch = queue.take(1_200)
            assert batch.size <= 1_200 and len(taken) + batch.size in ends
            taken += wire.decode_readings(batch.blob)
        assert [fields(r) for r in taken] == [fields(r) for share in shares for r in share]
        assert queue.pending == total  # counted until published


async def test_waiting_requests_are_admitted_in_the_order_they_came() -> None:
    """Three requests find the queue full; as room frees, each is admitted in its turn, even
    the small one that would have fit before the first in line."""
    ingestor, queue = _ingestor(10)
    assert ingestor.offer(_readings("full", 10)) == (10, 0)
    deadline = asyncio.get_running_loop().time() + 30
    order: list[str] = []

    async def admit(name: str, n: int) -> None:
        await ingestor.admit(_readings(name, n), deadline)
        order.append(name)

    tasks = [asyncio.create_task(admit(name, n)) for name, n in (("a", 6), ("b", 1), ("c", 3))]
    await asyncio.sleep(0)  # all three are in line
    assert order == [] and queue.pending == 10
    queue.take(10)
    queue.done(5)  # room for 5: not enough for "a", and "b" must wait behind it
    for _ in range(5):
        await asyncio.sleep(0)
    assert order == []
    queue.done(5)
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c"] and queue.pending == 10


async def test_a_request_without_room_at_its_deadline_is_refused_and_leaves_no_trace() -> None:
    ingestor, queue = _ingestor(10)
    ingestor.offer(_readings("full", 8))
    loop = asyncio.get_running_loop()
    with pytest.raises(Overloaded) as refused:
        await ingestor.admit(_readings("late", 3), loop.time() + 0.05)
    assert refused.value.retry_after_s == 1 and queue.pending == 8
    assert not await ingestor.room_for(3, loop.time() + 0.05)
    # The line moves on: the next request that fits is admitted at once.
    assert await ingestor.admit(_readings("next", 2), loop.time() + 5) == (2, 0)


async def test_closing_refuses_the_waiting_requests_at_once() -> None:
    """At shutdown nobody waits out their deadline: every request in line gets its 503 now."""
    ingestor, _ = _ingestor(4)
    ingestor.offer(_readings("full", 4))
    deadline = asyncio.get_running_loop().time() + 60
    waiting = [
        asyncio.create_task(ingestor.admit(_readings(f"w{n}", 2), deadline)) for n in range(3)
    ]
    sizing = asyncio.create_task(ingestor.room_for(2, deadline))
    await asyncio.sleep(0)
    ingestor.open = False
    async with asyncio.timeout(5):
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert await sizing  # let on, to be refused by the offer as shutting down
    assert all(isinstance(r, Overloaded) and r.retry_after_s == 5 for r in results), results


async def test_request_over_the_free_room_is_refused_whole(server_factory) -> None:
    """With no wait for room (the default), readings that fit the queue but not its free room
    now: 503, Retry-After, no trace."""
    # A long batch window keeps the first request's readings queued while the second comes.
    srv: Server = server_factory(
        queue_max_readings="50", workers="1", batch_window_ms="1500", admission_wait_ms="0"
    )
    first = [{"sensor_id": "adm-ok", "value": float(i), "id": f"k{i}"} for i in range(40)]
    second = [{"sensor_id": "adm-big", "value": float(i)} for i in range(20)]
    async with connect(f"{srv.ws_url}?sensor=adm-*") as ws:
        await receive_json(ws)
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
            r = await http.post("/v1/readings", json=first)
            assert r.status_code == 202 and r.json() == {"accepted": 40, "duplicates": 0}
            r = await http.post("/v1/readings", json=second)
            assert r.status_code == 503
            assert r.headers["retry-after"] == "1"
            assert "traceback" not in r.text.lower()
        got = await collect(ws, 40)
        assert {m["sensor_id"] for m in got} == {"adm-ok"}
        assert await quiet(ws, 1.0) == []


async def test_request_over_the_free_room_waits_for_it(server_factory) -> None:
    """With admission_wait_ms set, a request that finds the queue full waits until the queued
    readings are published, then is accepted."""
    srv: Server = server_factory(
        queue_max_readings="50", workers="1", batch_window_ms="1500", admission_wait_ms="20000"
    )
    first = [{"sensor_id": "wait-a", "value": float(i)} for i in range(40)]
    second = [{"sensor_id": "wait-b", "value": float(i)} for i in range(20)]
    async with connect(f"{srv.ws_url}?sensor=wait-*") as ws:
        await receive_json(ws)
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
            r = await http.post("/v1/readings", json=first)
            assert r.status_code == 202
            r = await http.post("/v1/readings", json=second)
            assert r.status_code == 202 and r.json() == {"accepted": 20, "duplicates": 0}
            metrics = (await http.get("/metrics")).text
        assert re.search(r"^sensorcast_admission_waits_total 1\.0$", metrics, re.M), metrics
        waited = re.search(r"^sensorcast_admission_wait_seconds_total (\S+)$", metrics, re.M)
        assert waited and 0 < float(waited[1]) < 20
        got = await collect(ws, 60)
        # The second request was admitted only once the first's predictions were out.
        assert [m["sensor_id"] for m in got] == ["wait-a"] * 40 + ["wait-b"] * 20
        assert await quiet(ws, 0.5) == []
