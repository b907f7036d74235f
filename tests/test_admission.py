"""Admission under a full pipeline: refused whole with 503, before or after parsing."""

from __future__ import annotations

import httpx

from tests.conftest import Server, collect, connect, quiet, receive_json


async def test_request_over_the_free_room_is_refused_whole(server_factory) -> None:
    """Readings that fit the queue but not its free room now: 503, Retry-After, no trace."""
    # A long batch window keeps the first request's readings queued while the second comes.
    srv: Server = server_factory(queue_max_readings="50", workers="1", batch_window_ms="1500")
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
