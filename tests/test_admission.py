"""Admission under a full pipeline: refused whole with 503, before or after parsing."""

from __future__ import annotations

import httpx

from tests.conftest import Server, collect, connect, receive_json


async def test_request_larger_than_the_free_room_is_refused_whole(server_factory) -> None:
    """More readings than the queues can hold: 503 with Retry-After, nothing predicted."""
    srv: Server = server_factory(queue_max_readings="50", workers="1")
    too_many = [{"sensor_id": "adm-big", "value": float(i)} for i in range(60)]
    fits = [{"sensor_id": "adm-ok", "value": float(i), "id": f"k{i}"} for i in range(40)]
    async with connect(f"{srv.ws_url}?sensor=adm-*") as ws:
        await receive_json(ws)
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
            r = await http.post("/v1/readings", json=too_many)
            assert r.status_code == 503
            assert r.headers["retry-after"] == "1"
            assert "traceback" not in r.text.lower()
            r = await http.post("/v1/readings", json=fits)
            assert r.status_code == 202 and r.json() == {"accepted": 40, "duplicates": 0}
        got = await collect(ws, 40)
    assert {m["sensor_id"] for m in got} == {"adm-ok"}
