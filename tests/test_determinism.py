"""Event-time determinism, end to end: a sensor's predictions depend only on its readings in
``ts`` order and the settings, not on request sizes, pace, shard count or topology."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.simulate import SensorSim
from tests.conftest import Server, collect, connect, quiet, receive_json, running

VOLATILE = ("seq", "epoch", "sensor_id", "id", "ingested_at", "predicted_at", "swapped_at")
READINGS = 400
SHAPES = {"single": 1, "bulk": 1_000, "paced": 50}
"""How each copy of the series is posted: readings per request (``paced`` also sleeps)."""


def series(channels: int) -> tuple[list[float], list[dict[str, float]]]:
    sim = SensorSim("d", channels=channels, seed=40 + channels, anomaly_rate=0.01, interval_s=1)
    ts, values, _ = sim.take(READINGS)
    names = sim.names
    return ts.tolist(), [dict(zip(names, row, strict=True)) for row in values.tolist()]


def bodies(sensor_id: str, channels: int) -> list[dict[str, Any]]:
    ts, rows = series(channels)
    if channels == 1:
        return [
            {"sensor_id": sensor_id, "ts": t, "value": row["value"], "id": str(i)}
            for i, (t, row) in enumerate(zip(ts, rows, strict=True))
        ]
    return [
        {"sensor_id": sensor_id, "ts": t, "values": row, "id": str(i)}
        for i, (t, row) in enumerate(zip(ts, rows, strict=True))
    ]


async def post_as(client: httpx.AsyncClient, items: list[dict[str, Any]], shape: str) -> None:
    size = SHAPES[shape]
    for start in range(0, len(items), size):
        r = await client.post("/v1/readings", json=items[start : start + size])
        assert r.status_code == 202, r.text
        if shape == "paced":
            await asyncio.sleep(0.02)


def normalised(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Each message without what differs by design (its sensor's id, wall-clock times)."""
    out = []
    for m in messages:
        fields = {k: v for k, v in m.items() if k not in VOLATILE}
        if "alarm_id" in fields:
            fields["alarm_id"] = fields["alarm_id"].partition("@")[2]
        out.append((m["type"], json.dumps(fields, sort_keys=True)))
    return out


@pytest.fixture(scope="module", params=["memory-1", "memory-2", "redis-2"])
def topology(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One shard or two, embedded or on Redis with a worker."""
    backend, shards = request.param.split("-")
    tmp: Path = tmp_path_factory.mktemp(request.param)
    with running(backend, tmp, {"SENSORCAST_WORKERS": shards}) as srv:
        yield srv


RESULTS: dict[str, dict[str, list[tuple[str, str]]]] = {}


async def test_same_predictions_however_the_readings_arrive(topology: Server) -> None:
    """One reading per request, 1,000 per request, or paced: identical messages (predictions
    value for value, model swaps at the same readings, alarms) for a one-channel and a
    three-channel sensor posted together, on this topology and on every other one tested."""
    got: dict[str, list[tuple[str, str]]] = {}
    async with httpx.AsyncClient(base_url=topology.url, timeout=30) as client:
        for shape in SHAPES:
            one, three = bodies(f"det-1-{shape}", 1), bodies(f"det-3-{shape}", 3)
            interleaved = [item for pair in zip(one, three, strict=True) for item in pair]
            async with connect(f"{topology.ws_url}?sensor=det-*-{shape}") as ws:
                await receive_json(ws)
                await post_as(client, interleaved, shape)
                messages = await collect_all(ws, 2 * READINGS)
            for channels in (1, 3):
                prefix = f"det-{channels}-"
                got[f"{shape}-{channels}"] = normalised(
                    [m for m in messages if m["sensor_id"].startswith(prefix)]
                )
    for channels in (1, 3):
        single, bulk, paced = (got[f"{shape}-{channels}"] for shape in SHAPES)
        assert single == bulk == paced, f"{channels} channel(s)"
        kinds = [kind for kind, _ in bulk]
        assert kinds.count("prediction") == READINGS and kinds.count("model") >= 1
        statuses = {json.loads(body)["status"] for kind, body in bulk if kind == "prediction"}
        assert statuses == {"warming_up", "ok"}
    for other, seen in RESULTS.items():
        assert seen == got, f"differs from the topology at {other}"
    RESULTS[topology.url] = got


async def collect_all(ws: Any, predictions: int) -> list[dict[str, Any]]:
    """Every message until ``predictions`` predictions came, and what follows them at once
    (a model swap or an alarm right after the last reading)."""
    out: list[dict[str, Any]] = []
    while sum(m["type"] == "prediction" for m in out) < predictions:
        out += await collect(ws, 1, kinds=KINDS)
    return out + await quiet(ws, 0.3, kinds=KINDS)


KINDS = ("prediction", "model", "alarm")
