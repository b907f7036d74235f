"""Subscriptions against real servers: resume, gaps, snapshot, slow clients, heartbeats,
client frames, REST queries and the ``sensorcast subscribe`` command."""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
import uuid
from collections import defaultdict
from typing import Any

import httpx
import psutil
import pytest
from websockets.exceptions import ConnectionClosed

from tests.conftest import (
    ROOT,
    Server,
    collect,
    connect,
    post,
    post_accepted,
    quiet,
    receive_json,
)
from tests.rawws import RawClient, TcpProxy

PATH = "/v1/ws/predictions"


def tag() -> str:
    return uuid.uuid4().hex[:8]


def readings(prefix: str, count: int, sensors: int = 10, start: int = 0) -> list[dict[str, Any]]:
    return [
        {"sensor_id": f"{prefix}-{i % sensors}", "value": float(i % 17), "id": str(i)}
        for i in range(start, start + count)
    ]


async def post_all(
    client: httpx.AsyncClient, items: list[dict[str, Any]], chunk: int = 1000
) -> None:
    for i in range(0, len(items), chunk):
        await post_accepted(client, items[i : i + chunk])


async def messages_until_quiet(ws: Any, seconds: float = 0.5) -> list[dict[str, Any]]:
    """Every frame (all types) until none arrives for ``seconds``."""
    out: list[dict[str, Any]] = []
    while True:
        try:
            out.append(await receive_json(ws, seconds))
        except TimeoutError:
            return out


# Resume, gaps, epochs, snapshot


async def test_resume_mid_stream_is_exact(server: Server, http: httpx.AsyncClient) -> None:
    """A client cut off three times mid-stream resumes with since: every message once, in order."""
    t = tag()
    total = 3000
    async with connect(f"{server.ws_url}?sensor={t}-*") as ws:
        hello = await receive_json(ws)
    since, epoch = hello["seq"], hello["epoch"]
    got: list[dict[str, Any]] = []
    cut_at = {400, 1300, 2200}

    async def produce() -> None:
        for i in range(0, total, 100):
            await post_all(http, readings(t, 100, sensors=7, start=i))
            await asyncio.sleep(0.005)

    async with TcpProxy(server.port) as proxy:
        producer = asyncio.create_task(produce())
        base = f"ws://127.0.0.1:{proxy.port}{PATH}?sensor={t}-*"
        deadline = time.monotonic() + 60
        while len(got) < total and time.monotonic() < deadline:
            try:
                async with connect(f"{base}&since={since}&epoch={epoch}") as ws:
                    again = await receive_json(ws)
                    assert again["type"] == "hello" and again["epoch"] == epoch
                    while len(got) < total:
                        m = await receive_json(ws)
                        assert m["type"] in ("prediction", "model", "alarm"), m
                        since = m["seq"]
                        if m["type"] != "prediction":
                            continue
                        got.append(m)
                        if len(got) in cut_at:
                            cut_at.discard(len(got))
                            proxy.cut()
            except ConnectionClosed:
                pass
        await producer
        assert proxy.cuts == 3
    assert sorted(int(m["id"]) for m in got) == list(range(total))
    seqs = [m["seq"] for m in got]
    assert all(a < b for a, b in zip(seqs, seqs[1:], strict=False))


async def _all_messages(ws: Any, predictions: int) -> list[dict[str, Any]]:
    """Predictions, model and alarm frames until ``predictions`` predictions arrived.

    A ``lagged`` frame fails at once: what it counts will never arrive, and waiting for it
    would only end in a timeout that says nothing of why."""
    out: list[dict[str, Any]] = []
    count = 0
    while count < predictions:
        [m] = await collect(ws, 1, kinds=("prediction", "model", "alarm", "lagged"))
        assert m["type"] != "lagged", f"this subscriber lost {m['dropped']} messages: {m}"
        out.append(m)
        count += m["type"] == "prediction"
    return out


async def test_gap_when_since_is_older_than_the_history(server_factory) -> None:
    """since older than the kept history: a gap naming exactly the lost seqs, then the rest."""
    srv: Server = server_factory(history_max_frames="100")
    async with httpx.AsyncClient(base_url=srv.url) as http, connect(srv.ws_url) as live:
        await receive_json(live)
        await post_all(http, readings("g", 300, sensors=3))
        seen = await _all_messages(live, 300)
        await asyncio.sleep(0.3)
        seen += await quiet(live, 0.2, kinds=("prediction", "model", "alarm"))
    latest = seen[-1]["seq"]
    async with connect(f"{srv.ws_url}?since=5") as ws:
        hello = await receive_json(ws)
        gap = await receive_json(ws)
        rest = await messages_until_quiet(ws)
    assert hello["seq"] == latest
    oldest = latest - 99
    assert gap == {
        "type": "gap", "epoch": hello["epoch"], "reason": "expired", "since": 5,
        "from_seq": 6, "to_seq": oldest - 1, "missed": oldest - 6,
    }  # fmt: skip
    assert [m["seq"] for m in rest] == list(range(oldest, latest + 1))
    assert rest == [m for m in seen if m["seq"] >= oldest]


async def test_epoch_change_is_announced_by_a_gap(server_factory) -> None:
    """Resuming across a restart: a gap with reason epoch_changed, then the new epoch's kept
    messages; a since ahead of the current epoch without epoch= is treated the same way."""
    first: Server = server_factory()
    async with httpx.AsyncClient(base_url=first.url) as http, connect(first.ws_url) as ws:
        old = await receive_json(ws)
        await post_all(http, readings("e", 80, sensors=2))
        before = await _all_messages(ws, 80)
    assert first.stop() == 0
    since = before[-1]["seq"]

    second: Server = server_factory()
    async with httpx.AsyncClient(base_url=second.url) as http, connect(second.ws_url) as ws:
        await receive_json(ws)
        await post_all(http, readings("e", 30, sensors=2, start=1000))
        after = await _all_messages(ws, 30)
    assert after[-1]["seq"] < since

    for query in (f"since={since}&epoch={old['epoch']}", f"since={since}"):
        async with connect(f"{second.ws_url}?{query}") as ws:
            hello = await receive_json(ws)
            gap = await receive_json(ws)
            rest = await messages_until_quiet(ws)
        assert hello["epoch"] != old["epoch"]
        assert gap["type"] == "gap" and gap["reason"] == "epoch_changed"
        assert gap["epoch"] == hello["epoch"] and gap["since"] == since
        assert gap["previous_epoch"] == (old["epoch"] if "epoch=" in query else None)
        assert (gap["from_seq"], gap["to_seq"], gap["missed"]) == (1, 0, 0)
        assert rest == after


async def test_since_ahead_in_the_same_epoch_skips_what_the_client_has(server_factory) -> None:
    """since above the latest seq of the same epoch (another replica ran ahead): no gap, and
    live messages at or below since are not sent again."""
    srv: Server = server_factory()
    async with httpx.AsyncClient(base_url=srv.url) as http:
        async with connect(srv.ws_url) as ws:
            hello = await receive_json(ws)
        ahead = hello["seq"] + 20
        async with connect(f"{srv.ws_url}?since={ahead}&epoch={hello['epoch']}") as ws:
            await receive_json(ws)
            await post_all(http, readings("a", 50, sensors=1))
            got = await collect(ws, 30, kinds=("prediction", "model", "alarm"))
            got += await messages_until_quiet(ws)
    last = got[-1]["seq"]
    assert last >= ahead + 30
    assert [m["seq"] for m in got] == list(range(ahead + 1, last + 1))


async def test_snapshot_gives_the_latest_prediction_of_each_matching_sensor(
    server: Server, http: httpx.AsyncClient
) -> None:
    """snapshot=true: after hello, one marked frame per matching sensor (its latest), then live."""
    t = tag()
    await post_all(http, readings(t, 12, sensors=4) + [{"sensor_id": f"x{t}", "value": 1.0}])
    async with connect(f"{server.ws_url}?sensor={t}") as probe:
        await receive_json(probe)  # only to wait until the posts were predicted
    # Every sensor's readings predicted (on Redis, partitions finish in any order).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        counts = [(await http.get(f"/v1/sensors/{t}-{i}")).json().get("count") for i in range(4)]
        if counts == [3, 3, 3, 3]:
            break
        await asyncio.sleep(0.05)
    async with connect(f"{server.ws_url}?sensor={t}-*&snapshot=true") as ws:
        hello = await receive_json(ws)
        snap = [await receive_json(ws) for _ in range(4)]
        assert await quiet(ws, 0.3) == []
        await post(http, {"sensor_id": f"{t}-0", "value": 2.0, "id": "live"})
        [live] = await collect(ws, 1)
    assert [m["sensor_id"] for m in snap] == [f"{t}-{i}" for i in range(4)]
    assert [m["id"] for m in snap] == ["8", "9", "10", "11"]
    assert all(m["type"] == "prediction" and m["snapshot"] is True for m in snap)
    assert all(m["seq"] <= hello["seq"] for m in snap)
    assert live["id"] == "live" and "snapshot" not in live


async def test_batch_frames_carry_every_prediction_in_seq_order(
    server: Server, http: httpx.AsyncClient
) -> None:
    """batch=true: predictions frames, items in seq order, none lost, bounded frame size."""
    t = tag()
    async with connect(f"{server.ws_url}?sensor={t}-*&batch=true") as ws:
        await receive_json(ws)
        await post_all(http, readings(t, 3000, sensors=5), chunk=1500)
        frames: list[dict[str, Any]] = []
        items = 0
        while items < 3000:
            frame = await receive_json(ws)
            frames.append(frame)
            items += len(frame.get("items", []))
    batches = [f for f in frames if f["type"] == "predictions"]
    got = [m for f in batches for m in f["items"]]
    assert sorted(int(m["id"]) for m in got) == list(range(3000))
    assert [m["seq"] for m in got] == sorted(m["seq"] for m in got)
    assert len(batches) < 300 and max(len(f["items"]) for f in batches) <= 500


# Slow subscribers


def _rss(srv: Server) -> int:
    return int(psutil.Process(srv.proc.pid).memory_info().rss)


async def _drain(raw: RawClient, quiet_s: float = 2.0) -> list[dict[str, Any]]:
    """A raw client's text frames (and its close frame) until the server closes or is quiet."""
    out: list[dict[str, Any]] = []
    while True:
        try:
            frame = await raw.frame(timeout_s=quiet_s)
        except TimeoutError:
            return out
        if frame is None:
            return out
        if frame.opcode == 0x8:
            out.append({"type": "close", "code": frame.close_code, "reason": frame.close_reason})
            return out
        if frame.opcode == 0x1:
            out.append(frame.json())


def _accounted(drained: list[dict[str, Any]]) -> int:
    """Messages a slow client received or was told it lost."""
    return sum(
        m["dropped"] if m["type"] == "lagged" else 1
        for m in drained
        if m["type"] in ("prediction", "model", "alarm", "lagged")
    )


async def test_a_client_that_never_reads_slows_nothing(server_factory) -> None:
    """40,000 readings with a never-reading client: ingestion as fast as without it, the fast
    subscriber gets everything, server RSS stays bounded, and the slow one is told what it lost."""
    # The never-reading client is reaped only after its socket took nothing for a minute:
    # a phase slowed down by a loaded machine must not close it before it is told what it
    # lost (its lagged frame is sent when it reads again, at the end).
    srv: Server = server_factory(history_max_frames="5000", ws_stall_timeout_s="60")
    n = 40_000
    # Posted a step at a time, each read before the next: the fast subscriber's backlog stays
    # well under its queue's 10,000 frames. All 40,000 at once, a warm pipeline can publish
    # faster than this process reads, and the fast one is rightly told ``lagged``.
    step = 4_000
    messages: list[dict[str, Any]] = []

    async def phase(http: httpx.AsyncClient, ws: Any, start: int) -> tuple[float, int]:
        peak = 0
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _rss(srv))
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        t0 = time.perf_counter()
        sent = readings("slow", n, sensors=200, start=start)
        got: list[dict[str, Any]] = []
        for i in range(0, n, step):
            await post_all(http, sent[i : i + step])
            got += await _all_messages(ws, step)
        elapsed = time.perf_counter() - t0
        got += await quiet(ws, 0.3, kinds=("prediction", "model", "alarm"))
        messages.extend(got)
        done.set()
        await sampler
        ids = [int(m["id"]) for m in got if m["type"] == "prediction"]
        assert sorted(ids) == list(range(start, start + n))
        return elapsed, peak

    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
        async with connect(srv.ws_url) as fast:
            await receive_json(fast)
            base_time, _ = await phase(http, fast, 0)
            rss_before = _rss(srv)
            slow = await RawClient.connect(srv.port, PATH, rcvbuf=4096)
            try:
                messages.clear()
                slow_time, peak = await phase(http, fast, n)
                rss_after = _rss(srv)
                drained = await _drain(slow)
            finally:
                slow.close()
    mib = 1024 * 1024
    print(
        f"\n40k readings: {base_time:.2f} s alone, {slow_time:.2f} s beside a never-reading "
        f"client; server RSS {rss_before / mib:.0f} MiB before, peak {peak / mib:.0f} MiB, "
        f"after {rss_after / mib:.0f} MiB"
    )
    assert slow_time < base_time * 2 + 2
    assert peak - rss_before < 64 * mib
    hello = drained[0]
    assert hello["type"] == "hello"
    predictions = [m for m in drained if m["type"] == "prediction"]
    lagged = [m["dropped"] for m in drained if m["type"] == "lagged"]
    assert lagged and _accounted(drained) == len(messages)
    assert [m["seq"] for m in predictions] == sorted(m["seq"] for m in predictions)


@pytest.mark.parametrize("policy", ["drop_oldest", "latest_per_sensor", "disconnect"])
async def test_slow_client_policy(server_factory, policy: str) -> None:
    """Each policy does what it says to a client that stops reading; the fast one loses nothing."""
    srv: Server = server_factory(subscriber_queue_frames="1000", slow_client_policy=policy)
    # Enough to overflow the kernel's socket buffers (a few MiB) as well as the queue.
    n, sensors = 20_000, 20
    sent = readings("p", n, sensors=sensors)
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http, connect(srv.ws_url) as fast:
        await receive_json(fast)
        slow = await RawClient.connect(srv.port, PATH, rcvbuf=4096)
        try:
            got = []
            for i in range(0, n, 500):
                await post_all(http, sent[i : i + 500])
                got += await _all_messages(fast, 500)
            got += await quiet(fast, 0.3, kinds=("prediction", "model", "alarm"))
            drained = await _drain(slow)
        finally:
            slow.close()
    assert sorted(int(m["id"]) for m in got if m["type"] == "prediction") == list(range(n))
    predictions = [m for m in drained if m["type"] == "prediction"]
    lagged = [m["dropped"] for m in drained if m["type"] == "lagged"]
    seqs = [m["seq"] for m in predictions]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    if policy == "disconnect":
        assert drained[-1]["type"] == "close" and drained[-1]["code"] == 1013
        assert f"since={seqs[-1]}" in drained[-1]["reason"]
        assert not lagged
        assert [m["seq"] for m in drained[1:-1]] == [m["seq"] for m in got][: len(drained) - 2]
        return
    assert lagged and _accounted(drained) == len(got)
    per_sensor: dict[str, list[int]] = defaultdict(list)
    for m in predictions:
        per_sensor[m["sensor_id"]].append(int(m["id"]))
    assert all(ids == sorted(ids) for ids in per_sensor.values())
    if policy == "latest_per_sensor":
        last_sent = {str(r["sensor_id"]): int(r["id"]) for r in sent}
        assert {s: ids[-1] for s, ids in per_sensor.items()} == last_sent
    else:
        # drop_oldest keeps the newest: the stream ends with the last readings posted.
        # drop_oldest keeps the newest: after the last notice, the stream ends without holes.
        last_notice = max(i for i, m in enumerate(drained) if m["type"] == "lagged")
        tail = [
            m["seq"] for m in drained[last_notice:] if m["type"] in ("prediction", "model", "alarm")
        ]
        newest = sorted(m["seq"] for m in got)[-len(tail) :]
        assert tail and tail == newest


# Heartbeats


async def test_heartbeat_reaps_a_peer_that_never_answers_pings(server_factory) -> None:
    """A peer that never answers pings is closed (1011) after interval + timeout, while a
    peer that answers stays and keeps receiving."""
    srv: Server = server_factory(ws_ping_interval_s="0.3", ws_ping_timeout_s="0.3")
    async with httpx.AsyncClient(base_url=srv.url) as http, connect(srv.ws_url) as alive:
        await receive_json(alive)
        dead = await RawClient.connect(srv.port, PATH)
        t0 = time.monotonic()
        frames = []
        while (frame := await dead.frame(timeout_s=5)) is not None:
            frames.append(frame)
        closed_after = time.monotonic() - t0
        dead.close()
        await asyncio.sleep(0.7)
        await post(http, {"sensor_id": "hb", "value": 1.0, "id": "still-here"})
        [m] = await collect(alive, 1)
    assert any(f.opcode == 0x9 for f in frames)
    assert frames[-1].opcode == 0x8 and frames[-1].close_code == 1011
    assert 0.5 < closed_after < 3.0
    assert m["id"] == "still-here"


async def test_a_stalled_socket_is_dropped(server_factory) -> None:
    """A peer whose socket takes no bytes at all is dropped from the fan-out after
    ws_stall_timeout_s (well before any heartbeat); if it reads again before its socket is
    aborted, it gets what was sent, then a 1013 close naming the seq to resume from."""
    srv: Server = server_factory(ws_stall_timeout_s="2")
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
        slow = await RawClient.connect(srv.port, PATH, rcvbuf=4096)
        slow.stop_reading()
        try:
            # More than the socket buffers take, so the server's relay waits on the socket.
            await post_all(http, readings("stall", 5_000, sensors=5))
            for _ in range(200):
                metrics = (await http.get("/metrics")).text
                if "\nsensorcast_subscribers 0.0\n" in metrics:
                    assert "\nsensorcast_stalled_disconnects_total 1.0\n" in metrics
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the stalled subscriber was not dropped")
            # The socket is aborted a stall timeout after the close: read everything now.
            slow.resume_reading()
            frames = []
            while (frame := await slow.frame(timeout_s=5)) is not None:
                frames.append(frame)
        finally:
            slow.close()
    texts = [f.json() for f in frames if f.opcode == 0x1]
    seqs = [m["seq"] for m in texts if m["type"] in ("prediction", "model", "alarm")]
    assert frames[-1].close_code == 1013
    assert frames[-1].close_reason == (
        f"stalled: took nothing for 2 s; resume with since={seqs[-1]}"
    )
    assert seqs == list(range(seqs[0], seqs[-1] + 1)) and len(seqs) < 5_000


# Client frames


async def test_live_filter_change(server: Server, http: httpx.AsyncClient) -> None:
    """A subscribe frame swaps the filter: after the reply's seq only the new set arrives."""
    t = tag()
    async with (
        connect(f"{server.ws_url}?sensor={t}-a") as ws,
        connect(f"{server.ws_url}?sensor={t}-*") as everything,
    ):
        await receive_json(ws)
        await receive_json(everything)
        await post(http, [{"sensor_id": f"{t}-{s}", "value": 1.0, "id": f"1{s}"} for s in "ab"])
        [first] = await collect(ws, 1)
        # 1b may be scored on another shard after 1a: swap only once the hub has passed it on.
        await collect(everything, 2)
        await ws.send(json.dumps({"type": "subscribe", "sensors": [f"{t}-b", f"{t}-c*"]}))
        ack = await receive_json(ws)
        await post(
            http, [{"sensor_id": f"{t}-{s}", "value": 1.0, "id": f"2{s}"} for s in ("a", "b", "cc")]
        )
        after = await collect(ws, 2)
        assert await quiet(ws, 0.3) == []
    assert first["id"] == "1a"
    assert ack["type"] == "subscribed" and ack["sensors"] == [f"{t}-b", f"{t}-c*"]
    assert sorted(m["id"] for m in after) == ["2b", "2cc"]
    assert all(m["seq"] > ack["seq"] for m in after)


async def test_malformed_client_frames_get_an_error_and_the_connection_stays(
    server: Server, http: httpx.AsyncClient
) -> None:
    """Bad JSON, a wrong type or bad fields each get an error frame; the stream continues."""
    t = tag()
    async with connect(f"{server.ws_url}?sensor={t}") as ws:
        await receive_json(ws)
        for bad in (
            "{nope",
            json.dumps({"type": "unsubscribe"}),
            json.dumps({"type": "subscribe", "sensors": "bad id!"}),
            json.dumps({"type": "subscribe", "sensors": [t], "anomalies_only": "yes"}),
            json.dumps([1, 2]),
        ):
            await ws.send(bad)
            error = await receive_json(ws)
            assert error["type"] == "error" and error["reason"], bad
        await post(http, {"sensor_id": t, "value": 1.0, "id": "after"})
        [m] = await collect(ws, 1)
    assert m["id"] == "after"


async def test_binary_frame_closes_1003(server: Server) -> None:
    """A binary client frame closes the connection with 1003 and a reason."""
    async with connect(server.ws_url) as ws:
        await receive_json(ws)
        await ws.send(b"\x00\x01")
        with pytest.raises(ConnectionClosed) as closed:
            await quiet(ws, 5)
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1003
    assert "binary" in closed.value.rcvd.reason


async def test_oversized_frame_closes_1009(server: Server) -> None:
    """A client frame over ws_max_message_bytes closes the connection with 1009."""
    async with connect(server.ws_url) as ws:
        await receive_json(ws)
        await ws.send(json.dumps({"type": "subscribe", "sensors": ["x" * 100] * 1000}))
        with pytest.raises(ConnectionClosed) as closed:
            await quiet(ws, 5)
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


@pytest.mark.parametrize(
    "query",
    ["since=-3", "since=abc", "snapshot=maybe", "sensor=bad%20id", "epoch=%00", "batch=2"],
)
async def test_bad_query_is_refused_with_400(server: Server, query: str) -> None:
    """A malformed query is refused at the handshake with HTTP 400 naming the parameter."""
    import websockets

    with pytest.raises(websockets.InvalidStatus) as refused:
        async with connect(f"{server.ws_url}?{query}"):
            pass
    assert refused.value.response.status_code == 400
    assert query.split("=")[0] in refused.value.response.body.decode()


# Many subscribers


async def test_a_thousand_subscribers_each_receive_a_burst(server_factory) -> None:
    """1,000 concurrent subscribers each receive all 50 readings of a burst, within seconds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    srv: Server = server_factory()
    gate = asyncio.Semaphore(100)
    subscribers = 1000

    async def open_one() -> Any:
        async with gate:
            ws = await connect(f"{srv.ws_url}?sensor=burst-*").__aenter__()
            await receive_json(ws)
            return ws

    async def take(ws: Any, count: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while len(out) < count:
            message = json.loads(await ws.recv())
            if message["type"] == "prediction":
                out.append(message)
        return out

    t0 = time.perf_counter()
    clients = await asyncio.gather(*(open_one() for _ in range(subscribers)))
    connected = time.perf_counter() - t0
    try:
        async with httpx.AsyncClient(base_url=srv.url) as http, asyncio.timeout(30):
            t0 = time.perf_counter()
            await post(http, readings("burst", 50, sensors=5))
            results = await asyncio.gather(*(take(ws, 50) for ws in clients))
            elapsed = time.perf_counter() - t0
    finally:
        await asyncio.gather(*(ws.close() for ws in clients))
    print(
        f"\n1,000 subscribers connected in {connected:.2f} s; "
        f"50 predictions each in {elapsed:.2f} s"
    )
    assert all(sorted(int(m["id"]) for m in r) == list(range(50)) for r in results)
    assert elapsed < 15


# REST


async def test_sensor_queries(server: Server, http: httpx.AsyncClient) -> None:
    """GET /v1/sensors lists known sensors; /v1/sensors/{id} details one; unknown is 404."""
    t = tag()
    async with connect(f"{server.ws_url}?sensor={t}") as ws:
        await receive_json(ws)
        await post_all(http, [{"sensor_id": t, "value": float(i), "id": str(i)} for i in range(25)])
        await collect(ws, 25)
    listing = (await http.get("/v1/sensors")).json()
    mine = [s for s in listing["sensors"] if s["sensor_id"] == t]
    assert listing["count"] == len(listing["sensors"]) and len(mine) == 1
    assert mine[0]["count"] == 25 and mine[0]["last_prediction"]["id"] == "24"
    assert "recent_predictions" not in mine[0]
    one = (await http.get(f"/v1/sensors/{t}")).json()
    assert one["last_reading"]["values"] == {"value": 24.0} and one["last_reading"]["id"] == "24"
    assert [p["id"] for p in one["recent_predictions"]] == [str(i) for i in range(5, 25)]
    missing = await http.get(f"/v1/sensors/{t}-nope")
    assert missing.status_code == 404 and t in missing.json()["detail"]


# The command line


async def test_cli_subscribe_reconnects_and_resumes_exactly(
    server: Server, http: httpx.AsyncClient
) -> None:
    """sensorcast subscribe survives cut connections and prints every prediction once."""
    t = tag()
    total = 1500
    async with TcpProxy(server.port) as proxy:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "app", "subscribe",
            "--url", f"ws://127.0.0.1:{proxy.port}{PATH}", "--sensor", f"{t}-*",
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        assert proc.stdout is not None
        lines: list[dict[str, Any]] = []
        try:
            while not lines:
                # Until the command has connected: then its first line arrives.
                await post(http, {"sensor_id": f"{t}-x", "value": 0.0, "id": f"first-{tag()}"})
                try:
                    lines.append(json.loads(await asyncio.wait_for(proc.stdout.readline(), 1)))
                except TimeoutError:
                    continue
            for i in range(0, total, 100):
                await post_all(http, readings(t, 100, sensors=3, start=i))
                if i in (300, 800, 1200):
                    proxy.cut()
                await asyncio.sleep(0.02)
            printed = 1
            async with asyncio.timeout(20):
                while printed < total + 1:
                    lines.append(json.loads(await proc.stdout.readline()))
                    printed += lines[-1]["type"] == "prediction"
            assert proxy.cuts == 3
        finally:
            proc.terminate()
            await proc.wait()
    ids = [m["id"] for m in lines[1:] if m["type"] == "prediction"]
    assert sorted(int(i) for i in ids) == list(range(total))
    assert not [m for m in lines if m["type"] == "gap"]
