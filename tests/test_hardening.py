"""Hardening: bounded sensors, paginated queries, connection and subscriber limits, header and
body deadlines, trusted hosts, and no log flood from closed WebSockets. Real server, real
sockets, every wait bounded."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from websockets.exceptions import InvalidStatus

from app.edge import _OneWrite
from bench.hardening import tree_rss
from tests.conftest import (
    Server,
    collect,
    connect,
    post,
    post_accepted,
    receive_json,
    running,
    start_server,
)
from tests.rawws import RawClient

KEY_A = "hardening-key-a-0123456789"
KEY_B = "hardening-key-b-0123456789"


@pytest.fixture(scope="module")
def edge_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One worker, short header, body and keep-alive deadlines, small body budget, three
    subscribers at most."""
    srv = start_server(
        tmp_path_factory.mktemp("edge"),
        {
            "SENSORCAST_WORKERS": "1",
            "SENSORCAST_HEADER_TIMEOUT_S": "1",
            "SENSORCAST_KEEP_ALIVE_TIMEOUT_S": "1",
            "SENSORCAST_BODY_TIMEOUT_S": "1",
            "SENSORCAST_BODY_MIN_BYTES_PER_S": "1000000",
            "SENSORCAST_MAX_BODY_BYTES": str(2**20),
            "SENSORCAST_MAX_PENDING_BODY_BYTES": str(4 * 2**20),
            "SENSORCAST_MAX_SUBSCRIBERS": "3",
        },
    )
    yield srv
    srv.stop()


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def _answer(reader: asyncio.StreamReader, timeout_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), timeout_s)
    return data, time.monotonic() - started


def _status(head: bytes) -> int:
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0


async def _healthz_ms(url: str) -> float:
    async with httpx.AsyncClient(timeout=5) as client:
        started = time.perf_counter()
        assert (await client.get(url + "/healthz")).status_code == 200
        return (time.perf_counter() - started) * 1e3


def _refused(srv: Server, reason: str) -> float:
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    found = re.search(rf'sensorcast_connections_refused_total{{reason="{reason}"}} (\S+)', text)
    assert found, f"no connections_refused counter for {reason}"
    return float(found.group(1))


# -- headers, bodies, keep-alive ---------------------------------------------------------------


async def test_slow_headers_get_408_and_are_closed(edge_server: Server) -> None:
    """Headers trickled a byte at a time are answered 408 and closed at the header deadline."""
    reader, writer = await _open(edge_server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")

    async def trickle() -> None:
        for _ in range(20):
            await asyncio.sleep(0.2)
            writer.write(b"X")

    trickling = asyncio.create_task(trickle())
    try:
        data, took = await _answer(reader, 5)
    finally:
        trickling.cancel()
        writer.close()
    assert _status(data) == 408 and b"within 1 s" in data
    assert 0.8 < took < 3


async def test_silent_connection_is_closed(edge_server: Server) -> None:
    """A connection that never sends a byte is closed at the header deadline."""
    reader, writer = await _open(edge_server.port)
    data, took = await _answer(reader, 5)
    writer.close()
    assert data == b"" and 0.8 < took < 3


@pytest.mark.parametrize(
    "head",
    [
        b"X-Big: " + b"a" * 20_000 + b"\r\n\r\n",
        b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n",
        b"X-Endless: " + b"b" * 300_000,  # never terminated
    ],
    ids=["long-line", "many-fields", "unterminated"],
)
async def test_oversized_headers_get_431(edge_server: Server, head: bytes) -> None:
    """A header section over the size or field limit gets 431 at once and is closed."""
    reader, writer = await _open(edge_server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + head)
    try:
        data, took = await _answer(reader, 5)
    finally:
        writer.close()
    assert _status(data) == 431 and took < 0.8


async def test_idle_keep_alive_is_closed(edge_server: Server) -> None:
    """A keep-alive connection idle after its response is closed after keep_alive_timeout_s."""
    reader, writer = await _open(edge_server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert _status(head) == 200
    length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))  # type: ignore[union-attr]
    await reader.readexactly(length)
    rest, took = await _answer(reader, 5)
    writer.close()
    assert rest == b"" and 0.7 < took < 3


def _readings_body(prefix: str, count: int, pad: int = 0) -> bytes:
    return json.dumps(
        [
            {"sensor_id": f"{prefix}-{i % 5}", "value": 1.0, "id": f"{i}-" + "p" * pad}
            for i in range(count)
        ]
    ).encode()


async def test_stalled_bodies_time_out_and_give_back_their_budget(edge_server: Server) -> None:
    """Bodies stalled one byte short hold at most three quarters of the body budget: small
    POSTs are served meanwhile; the stalled ones get 408 at their deadline, after which a
    large POST fits again."""
    size = 2**20
    stalled = []
    for _ in range(4):
        reader, writer = await _open(edge_server.port)
        writer.write(
            b"POST /v1/readings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % size
        )
        writer.write(b" " * (size - 1))
        stalled.append((reader, writer))
    started = time.monotonic()
    big = _readings_body("stall-big", 4000, pad=100)
    assert 400_000 < len(big) < size
    async with httpx.AsyncClient(base_url=edge_server.url, timeout=10) as client:
        # Give the stalled bodies time to arrive, then check that they really hold the share
        # large bodies may use.
        for _ in range(20):
            r = await client.post(
                "/v1/readings", content=big, headers={"content-type": "application/json"}
            )
            if r.status_code != 202:
                break
            await asyncio.sleep(0.05)
        assert r.status_code == 503, r.text
        statuses: Counter[int] = Counter()
        for n in range(20):
            small = _readings_body(f"stall-small-{n}", 10)
            resp = await client.post(
                "/v1/readings", content=small, headers={"content-type": "application/json"}
            )
            statuses[resp.status_code] += 1
        assert statuses == {202: 20}
        answers = await asyncio.gather(*(_answer(reader, 8) for reader, _ in stalled))
        for _, writer in stalled:
            writer.close()
        codes = sorted(_status(data) for data, _ in answers)
        # Three fit in the large share and wait out their deadline (1 s + 1 MiB at 1 MB/s);
        # the fourth found no room.
        assert codes == [408, 408, 408, 503], codes
        assert time.monotonic() - started < 6
        r = await client.post(
            "/v1/readings", content=big, headers={"content-type": "application/json"}
        )
        assert r.status_code == 202, r.text
    assert _refused(edge_server, "body_timeout") >= 3


# -- trusted hosts -----------------------------------------------------------------------------


async def test_untrusted_host_is_refused(edge_server: Server) -> None:
    """On a loopback bind, Host evil.example gets 400 (HTTP and WebSocket, before accept)
    while loopback names are served."""
    async with httpx.AsyncClient(base_url=edge_server.url, timeout=5) as client:
        for host in ("localhost", f"localhost:{edge_server.port}", "127.0.0.1", "[::1]:80"):
            assert (await client.get("/healthz", headers={"host": host})).status_code == 200
        r = await client.get("/healthz", headers={"host": "evil.example"})
        assert r.status_code == 400 and "Host" in r.json()["detail"]
        r = await client.post(
            "/v1/readings", json={"sensor_id": "x", "value": 1}, headers={"host": "evil.example"}
        )
        assert r.status_code == 400
    with pytest.raises(ConnectionError) as refused:
        await _raw_ws(edge_server.port, host="evil.example")
    assert "HTTP/1.1 400" in str(refused.value)
    ok = await _raw_ws(edge_server.port, host=f"localhost:{edge_server.port}")
    ok.close()


async def _raw_ws(port: int, host: str, extra: str = "") -> RawClient:
    """A raw WebSocket handshake with the given Host; ConnectionError with the response head
    when refused."""
    return await RawClient.connect(port, f"/v1/ws/predictions{extra}", host=host)


# -- subscribers and connections ---------------------------------------------------------------


async def test_subscriber_limit_refuses_with_503_before_accept(edge_server: Server) -> None:
    """Past max_subscribers a handshake gets 503 with Retry-After, counted and logged once;
    /healthz stays fast; a freed slot is taken again."""
    before = _refused(edge_server, "subscribers")
    held = [await connect(edge_server.ws_url).__aenter__() for _ in range(3)]
    try:
        for ws in held:
            assert (await receive_json(ws))["type"] == "hello"
        for _ in range(5):
            with pytest.raises(InvalidStatus) as refused:
                async with connect(edge_server.ws_url):
                    pass
            response = refused.value.response
            assert response.status_code == 503
            assert response.headers["Retry-After"] == "5"
            assert b"too many subscribers" in response.body
            assert await _healthz_ms(edge_server.url) < 500
        assert _refused(edge_server, "subscribers") == before + 5
        lines = [line for line in edge_server.log().splitlines() if "over max_subscribers" in line]
        assert len(lines) == 1, lines
    finally:
        await held.pop().close()
    async with connect(edge_server.ws_url) as ws:
        assert (await receive_json(ws))["type"] == "hello"
    for ws in held:
        await ws.close()


@pytest.fixture
def keyed_server(server_factory: Callable[..., Server]) -> Server:
    return server_factory(
        workers="1",
        api_keys=f"{KEY_A},{KEY_B}",
        max_connections="6",
        max_subscribers_per_key="1",
        trusted_hosts="api.example.com,127.0.0.1",
    )


async def test_connection_and_per_key_limits(keyed_server: Server) -> None:
    """Past max_connections, HTTP requests and handshakes get 503 with Retry-After; one key
    holds at most max_subscribers_per_key subscribers, other keys are not affected; the
    configured Host names are served and others are not."""
    srv = keyed_server
    url = srv.ws_url
    first = await connect(f"{url}?key={KEY_A}").__aenter__()
    try:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"{url}?key={KEY_A}"):
                pass
        assert refused.value.response.status_code == 503
        assert b"for this API key" in refused.value.response.body
        async with connect(f"{url}?key={KEY_B}") as other:
            assert (await receive_json(other))["type"] == "hello"
    finally:
        await first.close()
    async with httpx.AsyncClient(base_url=srv.url, timeout=5) as client:
        assert (
            await client.get("/healthz", headers={"host": "api.example.com"})
        ).status_code == 200
        assert (await client.get("/healthz", headers={"host": "localhost"})).status_code == 400
    idle = [await _open(srv.port) for _ in range(6)]
    try:
        reader, writer = await _open(srv.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data, _ = await _answer(reader, 5)
        writer.close()
        assert _status(data) == 503 and b"retry-after: 5" in data.lower()
        with pytest.raises(ConnectionError) as ws_refused:
            await _raw_ws(srv.port, "127.0.0.1", f"?key={KEY_B}")
        assert "HTTP/1.1 503" in str(ws_refused.value)
    finally:
        for _, writer in idle:
            writer.close()
    async with httpx.AsyncClient(base_url=srv.url, timeout=2) as client:
        for _ in range(100):
            try:
                if (await client.get("/healthz")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("connections were not given back")
        metrics = (await client.get("/metrics", headers={"x-api-key": KEY_A})).text
    assert re.search(r'sensorcast_connections_refused_total\{reason="connections"\} [2-9]', metrics)
    assert re.search(r'reason="subscribers_per_key"\} 1\.0', metrics)


# -- sensors: limit, eviction, pages, snapshot -------------------------------------------------


def _reading(sensor: str, n: int, base: float) -> dict[str, Any]:
    return {
        "sensor_id": sensor,
        "ts": base + n,
        "value": 20.0 + (n % 7) * 0.5,
        "id": f"{sensor}-{n}",
    }


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def test_sensor_limit_and_idle_eviction_with_resume(backend: str, tmp_path: Path) -> None:
    """New sensors past max_sensors are refused whole (507, the limit named); an idle sensor is
    evicted (its model kept: in the model dir, or in Redis by the worker), which frees its slot,
    and comes back with its model version."""
    model_dir = tmp_path / "models"
    env = {
        "SENSORCAST_MAX_SENSORS": "2",
        "SENSORCAST_SENSOR_IDLE_EVICT_S": "3",
        "SENSORCAST_MODEL_WARMUP_READINGS": "32",
    }
    if backend == "memory":
        env |= {"SENSORCAST_WORKERS": "1", "SENSORCAST_MODEL_DIR": str(model_dir)}

    async def model_kept() -> bool:
        if backend == "memory":
            return (model_dir / "ev-a.model").exists()
        async with aioredis.from_url(srv.env["SENSORCAST_BACKEND"]) as r:
            keys = [k async for k in r.scan_iter(match="sensorcast:models:*")]
            return any([await r.hexists(k, "ev-a") for k in keys])

    base = time.time() - 1000
    with running(backend, tmp_path, env) as srv:
        async with (
            connect(srv.ws_url) as ws,
            httpx.AsyncClient(base_url=srv.url, timeout=10) as http,
        ):
            assert (await receive_json(ws))["type"] == "hello"
            batch = [_reading("ev-a", n, base) for n in range(40)]
            assert (await post(http, batch)).status_code == 202
            first = await collect(ws, 41, kinds=("prediction", "model"))
            [model] = [m for m in first if m["type"] == "model"]
            version = model["model_version"]
            assert model["sensor_id"] == "ev-a" and version >= 1
            refused = await post(
                http,
                [_reading("ev-a", 40, base), _reading("ev-b", 0, base), _reading("ev-c", 0, base)],
            )
            assert refused.status_code == 507
            detail = refused.json()["detail"]
            assert "SENSORCAST_MAX_SENSORS" in detail and "limit of 2 sensors" in detail
            assert (await post(http, [_reading("ev-b", 0, base)])).status_code == 202
            # Nothing of the refused request was taken: the next prediction is ev-b's.
            [after] = await collect(ws, 1)
            assert after["id"] == "ev-b-0"
            deadline = time.monotonic() + 15
            while (await http.get("/v1/sensors/ev-a")).status_code != 404:
                assert time.monotonic() < deadline, "ev-a was not evicted"
                await asyncio.sleep(0.1)
            while not await model_kept():
                assert time.monotonic() < deadline, "ev-a's model was not kept"
                await asyncio.sleep(0.1)
            while (await post(http, [_reading("ev-c", 0, base)])).status_code == 507:
                assert time.monotonic() < deadline, "no slot was freed"
                await asyncio.sleep(0.1)
            # ev-b, idle since, leaves too; then ev-a has a slot again.
            while (await post(http, [_reading("ev-a", 41, base)])).status_code == 507:
                assert time.monotonic() < deadline, "ev-b was not evicted"
                await asyncio.sleep(0.1)
            back = [m for m in await collect(ws, 2) if m["sensor_id"] == "ev-a"]
            assert back and back[-1]["model_version"] == version and back[-1]["status"] == "ok"


@pytest.fixture(scope="module")
def many_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Quick heartbeats, so a WebSocket that never reads is closed soon."""
    srv = start_server(
        tmp_path_factory.mktemp("many"),
        {
            "SENSORCAST_WORKERS": "1",
            "SENSORCAST_WS_PING_INTERVAL_S": "0.5",
            "SENSORCAST_WS_PING_TIMEOUT_S": "0.5",
        },
    )
    yield srv
    srv.stop()


async def test_sensor_pages_cover_every_sensor_once_and_snapshot_is_whole(
    many_server: Server,
) -> None:
    """Pages of /v1/sensors list every sensor exactly once, even while new sensors arrive; a
    snapshot of thousands of sensors arrives whole while /healthz stays fast."""
    srv = many_server
    wanted = {f"page-{i:05d}" for i in range(3000)}
    async with httpx.AsyncClient(base_url=srv.url, timeout=10) as http:
        ordered = sorted(wanted)
        for start in range(0, 3000, 1000):
            batch = [{"sensor_id": s, "value": 1.0} for s in ordered[start : start + 1000]]
            assert (await post(http, batch)).status_code == 202
        deadline = time.monotonic() + 30
        while (await http.get("/v1/sensors", params={"limit": 1})).json()["total"] < 3000:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        assert (await http.get("/v1/sensors", params={"limit": 1001})).status_code == 422
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            params: dict[str, Any] = {"limit": 700}
            if cursor:
                params["cursor"] = cursor
            page = (await http.get("/v1/sensors", params=params)).json()
            assert page["count"] == len(page["sensors"]) <= 700
            seen += [s["sensor_id"] for s in page["sensors"]]
            pages += 1
            # New sensors keep arriving between pages, before and after the cursor.
            late = [
                {"sensor_id": f"page-{pages:05d}-late", "value": 1.0},
                {"sensor_id": f"a-late-{pages}", "value": 1.0},
            ]
            assert (await post(http, late)).status_code == 202
            cursor = page["next"]
            if cursor is None:
                break
        counts = Counter(seen)
        assert max(counts.values()) == 1
        assert wanted <= set(seen)
        assert pages >= 5
    probes: list[float] = []
    async with connect(f"{srv.ws_url}?snapshot=true&sensor=page-0*") as ws:
        hello = await receive_json(ws)
        assert hello["type"] == "hello"
        snapshot: list[str] = []
        probe = asyncio.create_task(_probe(srv.url, probes))
        while not wanted <= set(snapshot):
            frame = await receive_json(ws)
            if frame.get("snapshot"):
                snapshot.append(frame["sensor_id"])
        probe.cancel()
    assert set(snapshot) >= wanted and len(snapshot) == len(set(snapshot))
    assert snapshot == sorted(snapshot)
    assert probes and max(probes) < 500


async def _probe(url: str, out: list[float]) -> None:
    while True:
        out.append(await _healthz_ms(url))
        await asyncio.sleep(0.01)


async def test_never_reading_subscribers_cause_no_log_flood(many_server: Server) -> None:
    """WebSockets that never read are closed by the heartbeat and their sockets given back,
    without a warning per connection (no send after close)."""
    srv = many_server
    before = srv.log().count("\n")
    clients = [
        await RawClient.connect(srv.port, "/v1/ws/predictions", rcvbuf=4096) for _ in range(30)
    ]
    try:
        async with httpx.AsyncClient(base_url=srv.url, timeout=10) as http:
            stop = time.monotonic() + 4
            n = 0
            while time.monotonic() < stop:
                body = [
                    {"sensor_id": f"flood-{i}", "value": float(n), "id": f"{n}-{i}"}
                    for i in range(200)
                ]
                assert (await post(http, body)).status_code in (202, 503)
                n += 1
                await asyncio.sleep(0.02)
            deadline = time.monotonic() + 15
            while True:
                metrics = (await http.get("/metrics")).text
                if re.search(r"^sensorcast_subscribers 0\.0$", metrics, re.M):
                    break
                assert time.monotonic() < deadline, "never-reading subscribers were not dropped"
                await asyncio.sleep(0.2)
    finally:
        for client in clients:
            client.close()
    new_lines = srv.log().splitlines()[before:]
    assert not [line for line in new_lines if "subscriber ended" in line or "RuntimeError" in line]
    assert sum(" WARNING " in line or " ERROR " in line for line in new_lines) <= 5, new_lines[-10:]


STALL_TIMEOUT_S = 1.0


async def test_never_reading_subscribers_are_closed_while_readings_flow(
    server_factory: Callable[..., Server],
) -> None:
    """300 unfiltered subscribers that never read cost little: readings keep being accepted
    and reach a subscriber that reads, /healthz stays fast, and each stalled subscriber is
    closed (counted, logged once) soon after its socket stops taking data."""
    srv = server_factory(workers="1", ws_stall_timeout_s=str(STALL_TIMEOUT_S))
    before = srv.log().count("\n")
    silent = [
        await RawClient.connect(srv.port, "/v1/ws/predictions", rcvbuf=4096) for _ in range(300)
    ]
    for client in silent:
        client.stop_reading()
    probes: list[float] = []
    requests, per_request = 30, 50
    try:
        async with (
            httpx.AsyncClient(base_url=srv.url, timeout=30) as http,
            connect(srv.ws_url + "?batch=true", compression=None) as reader,
        ):
            await receive_json(reader)
            received = asyncio.create_task(collect(reader, requests * per_request, timeout_s=60))
            probe = asyncio.create_task(_probe(srv.url, probes))
            started = time.monotonic()
            for n in range(requests):
                body = [
                    {"sensor_id": f"silent-{i}", "value": float(n % 7), "id": f"{n}-{i}"}
                    for i in range(per_request)
                ]
                await post_accepted(http, body)
                await asyncio.sleep(0.1)
            posted = time.monotonic()
            while True:
                metrics = (await http.get("/metrics")).text
                if _metric(metrics, "sensorcast_stalled_disconnects_total") >= len(silent):
                    break
                assert time.monotonic() < posted + 30, "stalled subscribers were not closed"
                await asyncio.sleep(0.1)
            closed_after = time.monotonic() - started
            got = await received
            probe.cancel()
            metrics = (await http.get("/metrics")).text
    finally:
        for client in silent:
            client.close()
    assert len({(m["sensor_id"], m["id"]) for m in got}) == requests * per_request
    # Each silent socket fills within the first few posts and is closed a stall timeout later.
    assert closed_after < posted - started + STALL_TIMEOUT_S + 10
    assert _metric(metrics, "sensorcast_subscribers") == 1
    assert probes and sorted(probes)[len(probes) // 2] < 100 and max(probes) < 2000
    new_lines = srv.log().splitlines()[before:]
    assert not [line for line in new_lines if "subscriber ended" in line or "RuntimeError" in line]
    assert sum(" WARNING " in line or " ERROR " in line for line in new_lines) <= 5, new_lines[-10:]
    assert any("socket took nothing" in line for line in new_lines)


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    return float(m[1]) if m else float("nan")


# -- memory per sensor -------------------------------------------------------------------------

PER_SENSOR_BOUND_KIB = 24
"""Generous against the README's measured figure (see "Hardening and limits")."""


@pytest.mark.slow
async def test_memory_per_sensor_is_bounded(server_factory: Callable[..., Server]) -> None:
    """20,000 sensors of one reading each cost the service and its model processes less than
    the README's per-sensor figure (with a generous margin)."""
    srv = server_factory(workers="1")
    sensors = 20_000
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
        warm = [{"sensor_id": f"warm-{i}", "value": 1.0} for i in range(1000)]
        assert (await post(http, warm)).status_code == 202
        await _wait_total(http, 1000)
        before = tree_rss(srv.proc.pid)
        for start in range(0, sensors, 1000):
            body = [{"sensor_id": f"mem-{i}", "value": 1.0} for i in range(start, start + 1000)]
            assert (await post(http, body)).status_code == 202
        await _wait_total(http, 1000 + sensors)
        await asyncio.sleep(6)  # one checkpoint interval: the copy in the service is counted
        grown = tree_rss(srv.proc.pid) - before
    per_sensor_kib = grown / sensors / 1024
    print(f"memory per sensor: {per_sensor_kib:.1f} KiB")
    assert 0 < per_sensor_kib < PER_SENSOR_BOUND_KIB


async def _wait_total(http: httpx.AsyncClient, total: int) -> None:
    deadline = time.monotonic() + 60
    while (await http.get("/v1/sensors", params={"limit": 1})).json()["total"] < total:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)


class _Recording:
    """A transport that records what is written to it and whether it was closed."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def test_an_ingest_response_goes_out_in_one_write() -> None:
    """The status line and headers wait for the body and go out with it; a 100 Continue
    goes out at once; closing writes a held head first."""
    raw = _Recording()
    out = _OneWrite(raw)  # type: ignore[arg-type]
    out.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    out.write(b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n")
    assert raw.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    out.write(b"{}")
    assert raw.writes[1:] == [b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n{}"]
    out.write(b"more")  # anything after goes straight through
    assert raw.writes[2:] == [b"more"]
    broken = _Recording()
    cut = _OneWrite(broken)  # type: ignore[arg-type]
    cut.write(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
    cut.close()
    assert broken.writes == [b"HTTP/1.1 500 Internal Server Error\r\n\r\n"] and broken.closed
    assert cut.is_closing()
