"""Limits and backpressure: each refusal status, idempotent retries, overload with bounded
memory and every accepted reading predicted."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import Server, collect, connect, post, quiet, receive_json, start_server


def tag() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with every request limit set low."""
    srv = start_server(
        tmp_path_factory.mktemp("limited"),
        {
            "SENSORCAST_WORKERS": "1",
            "SENSORCAST_MAX_BODY_BYTES": "4096",
            "SENSORCAST_MAX_PENDING_BODY_BYTES": "4096",
            "SENSORCAST_MAX_READINGS_PER_REQUEST": "20",
            "SENSORCAST_MAX_CHANNELS": "3",
            "SENSORCAST_MAX_SENSOR_ID_CHARS": "24",
            "SENSORCAST_MAX_READING_ID_CHARS": "10",
            "SENSORCAST_QUEUE_MAX_READINGS": "15",
            "SENSORCAST_DEDUP_WINDOW_S": "2",
        },
    )
    yield srv
    srv.stop()


@pytest.fixture
async def client(limited: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=limited.url, timeout=30) as c:
        yield c


def detail(r: httpx.Response) -> str:
    body: dict[str, Any] = r.json()
    assert "Traceback" not in r.text
    return json.dumps(body)


async def test_too_many_readings_is_413(client: httpx.AsyncClient) -> None:
    """More readings than max_readings_per_request: 413 naming the limit, JSON and NDJSON."""
    body = [{"sensor_id": "a", "value": 1} for _ in range(21)]
    r = await post(client, body)
    assert r.status_code == 413 and "limit is 20" in detail(r)
    ndjson = "\n".join(json.dumps(x) for x in body)
    r = await client.post(
        "/v1/readings", content=ndjson, headers={"content-type": "application/x-ndjson"}
    )
    assert r.status_code == 413 and "limit is 20" in detail(r)


async def test_request_larger_than_a_shard_queue_is_413(client: httpx.AsyncClient) -> None:
    """A request that could never fit its shard's queue is 413 (not a 503 to retry forever)."""
    r = await post(client, [{"sensor_id": "a", "value": 1} for _ in range(16)])
    assert r.status_code == 413 and "smaller requests" in detail(r)


@pytest.mark.parametrize(
    ("reading", "field", "needle"),
    [
        ({"sensor_id": "s", "values": {"a": 1, "b": 2, "c": 3, "d": 4}}, "values", "3 channels"),
        ({"sensor_id": "s" * 25, "value": 1}, "sensor_id", "24 characters"),
        ({"sensor_id": "s" * 129, "value": 1}, "sensor_id", "1 to 24 characters of letters"),
        ({"sensor_id": "s\n", "value": 1}, "sensor_id", "1 to 24 characters of letters"),
        ({"sensor_id": "s", "values": {"a\n": 1}}, "values.a\\n", "channel name is 1 to 64"),
        ({"sensor_id": "s", "value": 1, "id": "r" * 11}, "id", "10 characters"),
        ({"sensor_id": "s", "value": 1, "id": "a\x00b"}, "id", "printable"),
        ({"sensor_id": "s", "value": 1, "id": "a\u2028"}, "id", "printable"),
        ({"sensor_id": "s", "value": 1, "ts": "1969-12-31T23:59:59Z"}, "ts", "1970"),
        ({"sensor_id": "s", "value": 1, "ts": 1.7e12}, "ts", "milliseconds"),
    ],
)
async def test_limits_per_reading_are_422_naming_the_field(
    client: httpx.AsyncClient, reading: dict[str, Any], field: str, needle: str
) -> None:
    """Over a per-reading limit (settings or contract): 422 naming the item, field and limit."""
    r = await post(client, [{"sensor_id": "ok", "value": 1.0}, reading])
    assert r.status_code == 422
    [error] = r.json()["errors"]
    assert error["index"] == 1 and error["field"] == field
    assert needle in error["reason"], error


async def test_body_over_max_body_bytes_is_413(client: httpx.AsyncClient) -> None:
    """A body over max_body_bytes is 413 before it is parsed."""
    r = await client.post(
        "/v1/readings", content=b" " * 5000, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and "4096" in detail(r)


async def test_bodies_in_memory_are_bounded_503(limited: Server) -> None:
    """While one upload holds the body budget, another is refused at once with 503 + Retry-After,
    before its body is read; once the first completes, the next is taken."""
    release = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b'[{"sensor_id": "slow", "value": 1.0},'
        yield b" " * 3000
        await release.wait()
        yield b'{"sensor_id": "slow", "value": 2.0}]'

    async with (
        httpx.AsyncClient(base_url=limited.url, timeout=30) as a,
        httpx.AsyncClient(base_url=limited.url, timeout=30) as b,
    ):
        first = asyncio.create_task(
            a.post(
                "/v1/readings", content=slow_body(), headers={"content-type": "application/json"}
            )
        )
        await asyncio.sleep(0.5)
        body = json.dumps([{"sensor_id": "quick", "value": 1.0}] * 10).ljust(1500).encode()
        r = await b.post("/v1/readings", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1" and "bodies" in detail(r)
        release.set()
        assert (await first).json() == {"accepted": 2, "duplicates": 0}
        r = await b.post("/v1/readings", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 202


async def test_retries_are_deduplicated(limited: Server, client: httpx.AsyncClient) -> None:
    """A retried request is acknowledged as duplicates and predicted once; duplicates inside
    one request count too; refused requests do not mark their ids as seen."""
    t = tag()
    body = [{"sensor_id": t, "value": float(i), "id": f"r{i}"} for i in range(5)]
    async with connect(f"{limited.ws_url}?sensor={t}") as ws:
        await receive_json(ws)
        assert (await post(client, body)).json() == {"accepted": 5, "duplicates": 0}
        assert (await post(client, body)).json() == {"accepted": 0, "duplicates": 5}
        again = [*body[3:], {"sensor_id": t, "value": 9.0, "id": "r5"}, body[0]]
        assert (await post(client, again)).json() == {"accepted": 1, "duplicates": 3}
        # Same id within one request: the first is taken.
        twice = [{"sensor_id": t, "value": 1.0, "id": "r6"}] * 2
        assert (await post(client, twice)).json() == {"accepted": 1, "duplicates": 1}
        # A refused request (422) leaves its good ids unseen, so the fixed retry is taken.
        bad = [{"sensor_id": t, "value": 1.0, "id": "r7"}, {"sensor_id": t, "value": "x"}]
        assert (await post(client, bad)).status_code == 422
        assert (await post(client, bad[:1])).json() == {"accepted": 1, "duplicates": 0}
        # The same id on another sensor is another reading.
        other = [{"sensor_id": f"{t}x", "value": 1.0, "id": "r0"}]
        assert (await post(client, other)).json() == {"accepted": 1, "duplicates": 0}
        got = await collect(ws, 8)
        assert await quiet(ws, 0.5) == []
    assert [m["id"] for m in got] == [f"r{i}" for i in range(8)]


async def test_dedup_forgets_after_the_window(client: httpx.AsyncClient) -> None:
    """After dedup_window_s, the same (sensor_id, id) is a new reading again."""
    one = {"sensor_id": tag(), "value": 1.0, "id": "again"}
    assert (await post(client, one)).json() == {"accepted": 1, "duplicates": 0}
    assert (await post(client, one)).json() == {"accepted": 0, "duplicates": 1}
    await asyncio.sleep(2.5)
    assert (await post(client, one)).json() == {"accepted": 1, "duplicates": 0}


@pytest.mark.slow
async def test_overload_is_refused_and_memory_stays_flat(server_factory) -> None:
    """Hammered past capacity: some 503s with Retry-After, server RSS flat, and every
    202-accepted reading predicted exactly once."""
    srv: Server = server_factory(
        workers="1",
        queue_max_readings="400",
        admission_wait_ms="0",  # refused at once, not slowed by waits for room
        batch_max_size="100",
        history_max_frames="2000",
        dedup_max_ids="20000",
        # The subscriber is only the observer of exactly-once here, and in this process it
        # reads slower than the server publishes for the whole run: let its socket buffer
        # what the kernel will (compressed frames), as it did before the bound existed.
        ws_send_buffer_bytes=str(64 * 2**20),
    )
    proc = psutil.Process(srv.proc.pid)
    accepted: list[str] = []
    statuses: Counter[int] = Counter()
    retry_after: set[str] = set()
    rss: list[float] = []
    stop = asyncio.Event()

    async def sample_rss() -> None:
        while not stop.is_set():
            rss.append(proc.memory_info().rss / 2**20)
            await asyncio.sleep(0.1)

    async def hammer(client: httpx.AsyncClient, worker: int) -> None:
        n = 0
        while not stop.is_set():
            body = [
                {
                    "sensor_id": f"load-{worker}-{i % 10}",
                    "value": float(i),
                    "id": f"{worker}.{n}.{i}",
                }
                for i in range(100)
            ]
            n += 1
            r = await post(client, body)
            statuses[r.status_code] += 1
            if r.status_code == 202:
                assert r.json() == {"accepted": 100, "duplicates": 0}
                accepted.extend(str(x["id"]) for x in body)
            elif r.status_code == 503:
                retry_after.add(r.headers["retry-after"])

    limits = httpx.Limits(max_connections=16)
    async with (
        connect(f"{srv.ws_url}?batch=true") as ws,
        httpx.AsyncClient(base_url=srv.url, timeout=30, limits=limits) as client,
    ):
        await receive_json(ws)
        received: list[dict[str, Any]] = []
        caught_up = asyncio.Event()

        async def subscribe() -> None:
            while True:
                message = await receive_json(ws, 60)
                assert message["type"] != "lagged", message
                if message["type"] == "predictions":
                    received.extend(message["items"])
                if stop.is_set() and len(received) >= len(accepted):
                    caught_up.set()

        reader = asyncio.create_task(subscribe())
        sampler = asyncio.create_task(sample_rss())
        hammers = [asyncio.create_task(hammer(client, w)) for w in range(16)]
        await asyncio.sleep(8)
        stop.set()
        await asyncio.gather(*hammers, sampler)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(caught_up.wait(), 30)
        await asyncio.sleep(0.5)
        reader.cancel()

    ids = [m["id"] for m in received]
    settled = rss[len(rss) // 4 :]
    print(
        f"\noverload: {statuses[202]} requests accepted ({len(accepted)} readings), "
        f"{statuses[503]} refused with 503; RSS MiB first {rss[0]:.1f}, after warm-up "
        f"{settled[0]:.1f}, max {max(rss):.1f}, last {rss[-1]:.1f}"
    )
    assert set(statuses) <= {202, 503}, statuses
    assert statuses[503] >= 10 and retry_after == {"1"}
    assert len(ids) == len(set(ids)), "a reading was predicted twice"
    assert sorted(ids) == sorted(accepted)
    assert max(settled) - settled[0] < 30, f"RSS grew from {settled[0]:.1f} to {max(settled):.1f}"
