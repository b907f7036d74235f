"""Alarm episodes through the running service: raised, held through a sustained fault,
acknowledged, cleared; over the WebSocket and REST, on memory:// and redis://; explanations."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np

from app.simulate import SensorSim
from tests.conftest import Server, collect, connect, post_accepted, receive_json

START, END, TOTAL = 600, 800, 900
"""A 1 Hz sensor whose three channels shift together from reading START to END."""


def fault_series(sensor_id: str) -> list[dict[str, Any]]:
    sim = SensorSim(sensor_id, channels=3, seed=31, anomaly_rate=0.0, interval_s=1.0)
    ts, values, _ = sim.take(TOTAL)
    values[START:END] += 6 * sim.noise
    return [
        {"sensor_id": sensor_id, "ts": t, "values": dict(zip(sim.names, row, strict=True))}
        for t, row in zip(ts.tolist(), values.tolist(), strict=True)
    ]


async def post_all(client: httpx.AsyncClient, items: list[dict[str, Any]]) -> None:
    for i in range(0, len(items), 500):
        await post_accepted(client, items[i : i + 500])


async def alarms_until(ws: Any, state: str) -> list[dict[str, Any]]:
    """Alarm frames received until one in ``state``."""
    got: list[dict[str, Any]] = []
    while not got or got[-1]["state"] != state:
        got += await collect(ws, 1, kinds=("alarm",), timeout_s=60)
    return got


async def test_an_alarm_is_raised_held_acknowledged_cleared_and_resumed(
    server: Server, http: httpx.AsyncClient
) -> None:
    """One alarm for a sustained fault: raised near its start, acknowledged, cleared after it
    ends; listed by GET /v1/alarms; in snapshots while active; replayed on resume."""
    sensor = f"alarm-{server.port}"
    series = fault_series(sensor)
    async with connect(f"{server.ws_url}?sensor={sensor}&anomalies_only=true") as ws:
        hello = await receive_json(ws)
        await post_all(http, series[: START + 100])
        [raised] = await alarms_until(ws, "raised")
        assert raised["sensor_id"] == sensor and raised["ended_at"] is None
        assert raised["channels"] and raised["detectors"] and raised["peak_score"] > 0.5
        started = raised["started_at"]
        active = (await http.get("/v1/alarms", params={"state": "active", "sensor": sensor})).json()
        assert [a["alarm_id"] for a in active["alarms"]] == [raised["alarm_id"]]
        assert active["alarms"][0]["acknowledged"] is False

        async with connect(f"{server.ws_url}?sensor={sensor}&snapshot=true") as snap:
            await receive_json(snap)
            frames = await collect(snap, 2, kinds=("prediction", "alarm"))
        assert [f["type"] for f in frames] == ["prediction", "alarm"]
        assert frames[1]["alarm_id"] == raised["alarm_id"] and frames[1]["snapshot"] is True

        r = await http.post(f"/v1/alarms/{raised['alarm_id']}/ack")
        assert r.status_code == 200 and r.json()["acknowledged"] is True
        [acked] = await alarms_until(ws, "acknowledged")
        assert acked["alarm_id"] == raised["alarm_id"]

        await post_all(http, series[START + 100 :])
        [cleared] = await alarms_until(ws, "cleared")
    assert cleared["alarm_id"] == raised["alarm_id"] and cleared["reason"] == "recovered"
    assert cleared["started_at"] == started and cleared["ended_at"] >= started
    recent = (await http.get("/v1/alarms", params={"state": "recent", "sensor": "alarm-*"})).json()
    mine = [a for a in recent["alarms"] if a["alarm_id"] == raised["alarm_id"]]
    assert mine and mine[0]["state"] == "cleared" and mine[0]["acknowledged"] is True
    assert not (await http.get("/v1/alarms", params={"state": "active", "sensor": sensor})).json()[
        "alarms"
    ]
    # A client that reconnects with since= is owed the whole episode, in order.
    async with connect(f"{server.ws_url}?sensor={sensor}&since={hello['seq']}") as again:
        await receive_json(again)
        replay = await alarms_until(again, "cleared")
    assert [a["state"] for a in replay] == ["raised", "acknowledged", "cleared"]


async def test_explanations_name_the_perturbed_channel(
    server: Server, http: httpx.AsyncClient
) -> None:
    """A spike on one channel of three: the anomalous prediction's explanation names it first,
    shares summing to 1."""
    sensor = f"explain-{server.port}"
    sim = SensorSim(sensor, channels=3, seed=13, anomaly_rate=0.0, interval_s=1.0)
    ts, values, _ = sim.take(400)
    values[380, 2] += 12 * sim.noise[2]
    items = [
        {
            "sensor_id": sensor,
            "ts": t,
            "values": dict(zip(sim.names, row, strict=True)),
            "id": str(i),
        }
        for i, (t, row) in enumerate(zip(ts.tolist(), values.tolist(), strict=True))
    ]
    async with connect(f"{server.ws_url}?sensor={sensor}") as ws:
        await receive_json(ws)
        await post_all(http, items)
        got = await collect(ws, 400)
    spike = next(p for p in got if p["id"] == "380")
    assert spike["is_anomaly"]
    explanation = spike["explanation"]
    assert explanation[0]["channel"] == sim.names[2]
    assert abs(sum(e["share"] for e in explanation) - 1.0) < 1e-3
    assert all(
        e["detector"] in {"spike", "level", "drift", "noise", "stuck", "multi-channel"}
        for e in explanation
    )
    assert all("explanation" not in p for p in got if not p["is_anomaly"])


async def test_acknowledging_needs_the_ack_scope(server_factory) -> None:
    """POST /v1/alarms/{id}/ack: 401 without a key, 403 with a subscribe key, 404 for an
    unknown alarm with an ack key, 200 with it (and with admin)."""
    ack, sub, admin = (
        "ack-key-7f3e9a0c1b2d4e5f",
        "sub-key-1a2b3c4d5e6f7a8b",
        "adm-key-9e8d7c6b5a4f3e2d",
    )
    srv: Server = server_factory(
        workers="1", api_keys=f"{ack}:ack,{sub}:subscribe+ingest,{admin}:admin"
    )
    sensor = "alarm-scoped"
    async with (
        httpx.AsyncClient(base_url=srv.url, timeout=30) as client,
        connect(f"{srv.ws_url}?sensor={sensor}&key={sub}") as ws,
    ):
        await receive_json(ws)
        client.headers["authorization"] = f"Bearer {sub}"
        await post_all(client, fault_series(sensor)[: START + 100])
        [raised] = await alarms_until(ws, "raised")
        path = f"/v1/alarms/{raised['alarm_id']}/ack"
        assert (await client.get("/v1/alarms")).status_code == 200
        assert (await client.post(path)).status_code == 403
        assert (await client.post(path, headers={"authorization": ""})).status_code == 401
        unknown = await client.post(
            "/v1/alarms/nope@1/ack", headers={"authorization": f"Bearer {ack}"}
        )
        assert unknown.status_code == 404 and "nope@1" in unknown.json()["detail"]
        r = await client.post(path, headers={"authorization": f"Bearer {ack}"})
        assert r.status_code == 200 and r.json()["acknowledged"] is True
        again = await client.post(path, headers={"authorization": f"Bearer {admin}"})
        assert again.status_code == 200 and again.json()["acknowledged"] is True
    assert np.isfinite(raised["peak_score"])
