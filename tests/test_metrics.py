"""GET /metrics: Prometheus text that moves with traffic; GET /v1/stats for the dashboard."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus

from app.looplag import LoopLagMonitor
from app.models import COMPILED
from tests.conftest import Server, collect, connect, post, receive_json

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is absent (apt-get install prometheus)"
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: Server) -> Samples:
    """Every sample of ``/metrics`` as {(name, sorted labels): value}."""
    response = httpx.get(f"{server.url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: Samples, name: str) -> float:
    """Sum of a metric over its labels."""
    return sum(v for (n, _), v in samples.items() if n == name)


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample, by name and labels."""
    return samples[(name, tuple(sorted(labels.items())))]


async def test_metrics_move_with_traffic(server: Server, http: httpx.AsyncClient) -> None:
    """Accepted, refused by reason, batches, latency, queues and subscribers all show traffic
    (the model stage's figures only where it runs: the embedded default, not an API replica)."""
    embedded = "SENSORCAST_BACKEND" not in server.env
    before = scrape(server)
    names = [
        "sensorcast_subscribers",
        "sensorcast_frames_dropped_total",
        "sensorcast_predictions_total",
        "sensorcast_requests_refused_total",
        "process_resident_memory_bytes",
    ]
    if embedded:
        names += [
            "sensorcast_queue_pending_readings",
            "sensorcast_queue_waiting_readings",
            "sensorcast_shards_healthy",
            "sensorcast_pool_rebuilds_total",
            "sensorcast_model_swaps_total",
        ]
    for name in names:
        assert any(n == name for n, _ in before), f"{name} missing"
    if embedded:
        assert value(before, "sensorcast_shards_healthy") == 2

    async with connect(server.ws_url) as ws:
        assert (await receive_json(ws))["type"] == "hello"
        during = scrape(server)
        assert (
            value(during, "sensorcast_subscribers") == value(before, "sensorcast_subscribers") + 1
        )
        readings = [{"sensor_id": f"metrics-{i % 3}", "value": float(i % 7)} for i in range(90)]
        assert (await post(http, readings)).status_code == 202
        assert (await post(http, readings[:1] + [{"sensor_id": "x"}])).status_code == 422
        assert (await post(http, [])).status_code == 422
        bad = await http.post(
            "/v1/readings", content=b"{", headers={"content-type": "application/json"}
        )
        assert bad.status_code == 400
        text = await http.post("/v1/readings", content=b"1", headers={"content-type": "text/plain"})
        assert text.status_code == 415
        await collect(ws, 90)

    after = scrape(server)
    moved = {"sensorcast_readings_accepted_total": 90, "sensorcast_predictions_total": 90}
    if embedded:
        moved["sensorcast_published_messages_total"] = 90
    for name, at_least in moved.items():
        assert total(after, name) - total(before, name) >= at_least, name
    refused = "sensorcast_requests_refused_total"
    assert (
        value(after, refused, reason="invalid", status="422")
        - value(before, refused, reason="invalid", status="422")
        == 2
    )
    assert (
        value(after, refused, reason="bad_body", status="400")
        - value(before, refused, reason="bad_body", status="400")
        == 1
    )
    assert (
        value(after, refused, reason="unsupported_media_type", status="415")
        - value(before, refused, reason="unsupported_media_type", status="415")
        == 1
    )
    assert value(after, "sensorcast_sensors") >= 3
    lag = [
        value(after, f"sensorcast_event_loop_lag_{figure}_seconds")
        for figure in ("p50", "p99", "max")
    ]
    assert 0 <= lag[0] <= lag[1] <= lag[2] < 5
    if not embedded:
        return
    for histogram in (
        "sensorcast_batch_size_readings_count",
        "sensorcast_pool_batch_seconds_count",
        "sensorcast_e2e_latency_seconds_count",
    ):
        assert total(after, histogram) > total(before, histogram), histogram
    batched = total(after, "sensorcast_batch_size_readings_sum") - total(
        before, "sensorcast_batch_size_readings_sum"
    )
    assert batched == 90
    assert total(after, "sensorcast_batches_total") > total(before, "sensorcast_batches_total")
    assert total(after, "sensorcast_queue_pending_readings") == 0


async def test_frames_dropped_for_lag(server_factory) -> None:
    """A subscriber whose queue overflows shows in frames_dropped and gets a lagged notice."""
    server = server_factory(subscriber_queue_frames="1")
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
        connect(server.ws_url) as ws,
    ):
        assert (await receive_json(ws))["type"] == "hello"
        readings = [{"sensor_id": "lag-1", "value": float(i)} for i in range(200)]
        assert (await post(http, readings)).status_code == 202
        deadline = time.monotonic() + 20
        dropped = 0.0
        while time.monotonic() < deadline:
            dropped = value(scrape(server), "sensorcast_frames_dropped_total")
            if dropped:
                break
            await asyncio.sleep(0.1)
        assert dropped >= 1
        lagged = [m for m in [await receive_json(ws) for _ in range(2)] if m["type"] == "lagged"]
        assert lagged and lagged[0]["dropped"] >= 1


async def test_stats_for_the_dashboard(embedded_server: Server) -> None:
    """GET /v1/stats counts accepted readings and reports recent latency and subscribers."""
    server = embedded_server
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
        connect(server.ws_url) as ws,
    ):
        first = (await http.get("/v1/stats")).json()
        await receive_json(ws)
        assert (await post(http, [{"sensor_id": "stats-1", "value": 1.0}] * 5)).status_code == 202
        await collect(ws, 5)
        second = (await http.get("/v1/stats")).json()
    assert second["accepted"] - first["accepted"] == 5
    assert second["subscribers"] >= 1
    assert second["time"] > first["time"]
    assert 0 < second["latency"]["p50_ms"] <= second["latency"]["p99_ms"] < 10_000


ADMIN = "admin-key-0123456789abcdef"
INGEST = "ingest-key-0123456789abcdef"


async def test_metrics_need_admin_and_count_key_refusals(server_factory) -> None:
    """Where keys are set, /metrics needs the admin scope, and POSTs refused for their key
    are counted as unauthorized (401) or forbidden (403)."""
    server = server_factory(api_keys=f"{ADMIN}:admin,{INGEST}:ingest")
    admin = {"X-API-Key": ADMIN}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        assert (await http.get("/metrics")).status_code == 401
        assert (await http.get("/metrics", headers={"X-API-Key": INGEST})).status_code == 403
        assert (await http.get("/v1/stats")).status_code == 401
        assert (await http.get("/")).status_code == 200  # the page holds no data
        before = (await http.get("/metrics", headers=admin)).text
        reading = [{"sensor_id": "keyed-1", "value": 1.0}]
        assert (await post(http, reading)).status_code == 401
        assert (await post(http, reading, headers={"X-API-Key": INGEST})).status_code == 202
        after = (await http.get("/metrics", headers=admin)).text

    def samples(text: str) -> Samples:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    first, second = samples(before), samples(after)
    refused = "sensorcast_requests_refused_total"
    unauthorized = {"reason": "unauthorized", "status": "401"}
    assert value(second, refused, **unauthorized) - value(first, refused, **unauthorized) == 1
    accepted = "sensorcast_readings_accepted_total"
    assert value(second, accepted) - value(first, accepted) == 1


@needs_promtool
async def test_metrics_pass_promtool(server: Server, http: httpx.AsyncClient) -> None:
    """After traffic of every kind, promtool check metrics finds nothing, and no *_created
    series is exported."""
    async with connect(server.ws_url) as ws:
        await receive_json(ws)
        assert (await post(http, [{"sensor_id": "lint-1", "value": 1.0}])).status_code == 202
        assert (await post(http, [{"sensor_id": "bad id", "value": 1.0}])).status_code == 422
        assert (await http.get("/v1/sensors/lint-1")).status_code in (200, 404)
        await collect(ws, 1)
    with pytest.raises(InvalidStatus):
        async with connect(server.ws_url + "?since=x"):
            pass
    text = (await http.get("/metrics")).text
    assert PROMTOOL is not None
    check = await asyncio.to_thread(
        subprocess.run,
        [PROMTOOL, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0 and check.stdout + check.stderr == "", check.stdout + check.stderr
    assert "_created" not in text


async def test_requests_counted_by_route_template_and_status(
    server: Server, http: httpx.AsyncClient
) -> None:
    """Requests are counted and timed by route template (not raw path) and status."""
    before = scrape(server)
    for sensor in ("tpl-a", "tpl-b", "tpl-c"):
        await http.get(f"/v1/sensors/{sensor}")
    assert (await http.get("/no/such/page")).status_code == 404
    assert (await post(http, [{"sensor_id": "tpl a", "value": 1.0}])).status_code == 422
    after = scrape(server)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    sensors = {"method": "GET", "route": "/v1/sensors/{sensor_id}"}
    count = "sensorcast_http_requests_total"
    assert sum(moved(count, **sensors, status=s) for s in ("200", "404")) == 3
    assert not any("tpl-" in v for (_, labels) in after for _, v in labels)
    assert moved(count, method="GET", route="unmatched", status="404") == 1
    assert moved(count, method="POST", route="/v1/readings", status="422") == 1
    duration = "sensorcast_http_request_duration_seconds"
    assert moved(f"{duration}_count", method="POST", route="/v1/readings", status="422") == 1
    assert moved(f"{duration}_sum", method="POST", route="/v1/readings", status="422") > 0


async def test_capacity_has_the_labels_of_pending(embedded_server: Server) -> None:
    """Each shard's pending and capacity gauges carry the same labels, so they divide."""
    samples = scrape(embedded_server)

    def labelled(name: str) -> set[tuple[tuple[str, str], ...]]:
        return {labels for n, labels in samples if n == name}

    pending = labelled("sensorcast_queue_pending_readings")
    assert len(pending) == 2 and pending == labelled("sensorcast_queue_capacity_readings")
    assert all(value(samples, "sensorcast_queue_capacity_readings", **dict(k)) > 0 for k in pending)
    assert value(samples, "sensorcast_build_info", **_build_labels(samples)) == 1
    # The server runs the default model as this suite does (compiled where it is built).
    assert _build_labels(samples)["model_code"] == ("compiled" if COMPILED else "python")
    assert value(samples, "sensorcast_ready") == 1


def _build_labels(samples: Samples) -> dict[str, str]:
    return dict(next(labels for n, labels in samples if n == "sensorcast_build_info"))


async def test_websocket_connections_and_refusals(server: Server) -> None:
    """The connections gauge follows open subscriptions; refused handshakes count by reason."""
    before = scrape(server)
    async with connect(server.ws_url) as ws:
        await receive_json(ws)
        during = scrape(server)
        assert (
            value(during, "sensorcast_websocket_connections")
            == value(before, "sensorcast_websocket_connections") + 1
        )
    with pytest.raises(InvalidStatus) as refusal:
        async with connect(f"{server.ws_url}?anomalies_only=maybe"):
            pass
    assert refusal.value.response.status_code == 400
    after = scrape(server)
    refused = "sensorcast_websocket_refused_total"
    assert (
        value(after, refused, reason="bad_query") - value(before, refused, reason="bad_query") == 1
    )
    assert value(after, "sensorcast_websocket_accepted_total") > value(
        before, "sensorcast_websocket_accepted_total"
    )
    deadline = time.monotonic() + 10
    while value(scrape(server), "sensorcast_websocket_connections") != value(
        before, "sensorcast_websocket_connections"
    ):
        assert time.monotonic() < deadline, "the closed connection is still counted"
        await asyncio.sleep(0.05)


async def test_dedup_table_size(embedded_server: Server) -> None:
    """Readings with ids grow the dedup table gauge; duplicates do not."""
    run = uuid.uuid4().hex[:8]
    batch = [{"sensor_id": f"dedup-{run}", "value": 1.0, "id": str(i)} for i in range(25)]
    async with httpx.AsyncClient(base_url=embedded_server.url, timeout=30) as http:
        before = value(scrape(embedded_server), "sensorcast_dedup_ids")
        assert (await post(http, batch)).json() == {"accepted": 25, "duplicates": 0}
        middle = value(scrape(embedded_server), "sensorcast_dedup_ids")
        assert (await post(http, batch)).json() == {"accepted": 0, "duplicates": 25}
        after = value(scrape(embedded_server), "sensorcast_dedup_ids")
    assert middle - before == 25 and after == middle


async def test_model_fits_are_timed(server_factory) -> None:
    """Fits of the default model show in model_fit_seconds once a sensor is past warm-up,
    with no failure counted."""
    srv = server_factory(workers="1", model_warmup_readings="32")
    batch = [{"sensor_id": "fit-1", "ts": 1.78e9 + i, "value": float(i % 5)} for i in range(80)]
    async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
        assert (await post(http, batch)).status_code == 202
    deadline = time.monotonic() + 30
    while (samples := scrape(srv)) and value(samples, "sensorcast_model_fit_seconds_count") < 1:
        assert time.monotonic() < deadline, "no fit was timed"
        await asyncio.sleep(0.1)
    assert 0 < value(samples, "sensorcast_model_fit_seconds_sum") < 30
    assert value(samples, "sensorcast_model_fit_failures_total") == 0


async def test_loop_lag_forgets_start_up() -> None:
    """A stall before reset() (start-up) is not in the summary; one after it is."""
    monitor = LoopLagMonitor()
    async with monitor:
        await asyncio.sleep(0.02)
        time.sleep(0.3)  # noqa: ASYNC251 (the loop blocked on purpose, as during start-up)
        await asyncio.sleep(0.01)
        assert monitor.summary().max_ms >= 250
        monitor.reset()
        await asyncio.sleep(0.05)
        assert monitor.summary().samples > 0 and monitor.summary().max_ms < 250
