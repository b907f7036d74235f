"""API keys with scopes, over HTTP and WebSocket; origins; rate limits; keys kept out of logs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from tests.conftest import Server, collect, connect, receive_json, start_server

INGEST = "ingest-key-5f0c2a9d81e4b7"
SUBSCRIBE = "subscribe-key-93ab1d0e6c"
ADMIN = "admin-key-0d7e4f1b2a9c38"
EVERYTHING = "all-scopes-key-6a1b9c3e"
FROM_FILE = "file-key-ingest-subscribe-77c2"
WRONG = "wrong-key-000000000000000"
ALL_KEYS = (INGEST, SUBSCRIBE, ADMIN, EVERYTHING, FROM_FILE, WRONG)
DASHBOARD = "https://dash.example.com"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with keys of every kind, from the environment and a keys file."""
    tmp = tmp_path_factory.mktemp("keyed")
    keys_file = tmp / "keys"
    keys_file.write_text(f"# operators' keys\n\n{FROM_FILE}:ingest+subscribe  # ci\n")
    srv = start_server(
        tmp,
        {
            "SENSORCAST_API_KEYS": f"{INGEST}:ingest, {SUBSCRIBE}:subscribe, {ADMIN}:admin, "
            f"{EVERYTHING}",
            "SENSORCAST_API_KEYS_FILE": str(keys_file),
            "SENSORCAST_ALLOWED_ORIGINS": DASHBOARD,
            "SENSORCAST_WORKERS": "1",
            "SENSORCAST_LOG_LEVEL": "info",
        },
    )
    yield srv
    srv.stop()


def reading() -> dict[str, object]:
    return {"sensor_id": f"auth-{uuid.uuid4().hex[:8]}", "value": 1.0}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        (bearer(WRONG), 401),
        ({"authorization": f"Basic {INGEST}"}, 401),
        (bearer(SUBSCRIBE), 403),
        (bearer(INGEST), 202),
        ({"x-api-key": INGEST}, 202),
        (bearer(ADMIN), 202),
        (bearer(EVERYTHING), 202),
        ({"x-api-key": FROM_FILE}, 202),
    ],
)
def test_post_readings_needs_the_ingest_scope(
    keyed: Server, headers: dict[str, str], status: int
) -> None:
    """POST /v1/readings: 401 without a valid key, 403 without the ingest scope, else 202."""
    r = httpx.post(f"{keyed.url}/v1/readings", json=reading(), headers=headers)
    assert r.status_code == status, r.text
    if status == 401:
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "key" in r.json()["detail"]
    if status == 403:
        assert "ingest" in r.json()["detail"]


def test_http_refuses_a_key_in_the_query(keyed: Server) -> None:
    """A key in the query string does not authenticate an HTTP request (it would be logged)."""
    r = httpx.post(f"{keyed.url}/v1/readings?key={INGEST}", json=reading())
    assert r.status_code == 401


def test_auth_is_checked_before_the_body(keyed: Server) -> None:
    """Without a key, even an unparseable body of the wrong type gets 401, not 400 or 415."""
    r = httpx.post(
        f"{keyed.url}/v1/readings", content=b"{nope", headers={"content-type": "text/plain"}
    )
    assert r.status_code == 401


@pytest.mark.parametrize(
    ("key", "status"), [(None, 401), (WRONG, 401), (INGEST, 403), (SUBSCRIBE, 200), (ADMIN, 200)]
)
def test_sensor_routes_need_the_subscribe_scope(
    keyed: Server, key: str | None, status: int
) -> None:
    """GET /v1/sensors and /v1/sensors/{id}: subscribe (or admin) scope."""
    headers = bearer(key) if key else {}
    assert httpx.get(f"{keyed.url}/v1/sensors", headers=headers).status_code == status
    r = httpx.get(f"{keyed.url}/v1/sensors/nobody", headers=headers)
    assert r.status_code == (404 if status == 200 else status)


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/openapi.json"])
def test_health_and_schema_stay_open(keyed: Server, path: str) -> None:
    """Health checks and the schema need no key."""
    assert httpx.get(f"{keyed.url}{path}").status_code == 200


async def ws_status(url: str, **kwargs: object) -> int:
    """The HTTP status of a refused handshake, or 101 once the hello frame arrived."""
    try:
        async with connect(url, **kwargs) as ws:
            hello = await receive_json(ws)
            assert hello["type"] == "hello"
            return 101
    except websockets.InvalidStatus as exc:
        return exc.response.status_code


@pytest.mark.parametrize(
    ("query", "headers", "status"),
    [
        ("", {}, 401),
        (f"?key={WRONG}", {}, 401),
        (f"?key={INGEST}", {}, 403),
        ("", bearer(INGEST), 403),
        (f"?key={SUBSCRIBE}", {}, 101),
        (f"?key={ADMIN}&sensor=x-*", {}, 101),
        ("", bearer(SUBSCRIBE), 101),
        ("", {"x-api-key": FROM_FILE}, 101),
    ],
)
async def test_websocket_needs_the_subscribe_scope(
    keyed: Server, query: str, headers: dict[str, str], status: int
) -> None:
    """The WebSocket handshake is refused with 401/403 before accept, by query key or header."""
    assert await ws_status(keyed.ws_url + query, additional_headers=headers) == status


async def test_refused_handshake_carries_the_reason(keyed: Server) -> None:
    """A refused handshake is a real HTTP response whose JSON body names the reason."""
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with connect(f"{keyed.ws_url}?key={INGEST}"):
            pass
    assert refused.value.response.status_code == 403
    assert b"subscribe" in refused.value.response.body
    await asyncio.sleep(0.2)
    assert "without completing handshake" not in keyed.log(), "a denial logged as an error"


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        (None, 101),
        (DASHBOARD, 101),
        ("https://DASH.example.com/", 101),
        ("same", 101),
        ("https://evil.example", 403),
        ("https://dash.example.com.evil.example", 403),
        ("http://dash.example.com", 403),
        ("null", 403),
    ],
)
async def test_websocket_origin_allow_list(keyed: Server, origin: str | None, status: int) -> None:
    """Only listed origins and the service's own may open a WebSocket from a browser."""
    if origin == "same":
        origin = f"http://127.0.0.1:{keyed.port}"
    kwargs = {"origin": origin} if origin is not None else {}
    got = await ws_status(f"{keyed.ws_url}?key={SUBSCRIBE}", **kwargs)
    assert got == status


async def test_a_subscriber_with_a_key_gets_predictions(keyed: Server) -> None:
    """Keys end to end: an ingest key's readings reach a subscribe key's socket."""
    sensor = f"auth-{uuid.uuid4().hex[:8]}"
    async with connect(f"{keyed.ws_url}?sensor={sensor}&key={SUBSCRIBE}") as ws:
        await receive_json(ws)
        async with httpx.AsyncClient(base_url=keyed.url, headers=bearer(INGEST)) as client:
            body = [{"sensor_id": sensor, "value": float(i), "id": str(i)} for i in range(20)]
            assert (await client.post("/v1/readings", json=body)).status_code == 202
        got = await collect(ws, 20)
    assert [m["id"] for m in got] == [str(i) for i in range(20)]


def test_keys_never_appear_in_the_log(keyed: Server) -> None:
    """After accepted and refused requests with every key, the server log holds none of them."""
    for key in ALL_KEYS:
        httpx.post(f"{keyed.url}/v1/readings", json=reading(), headers=bearer(key))
        httpx.post(f"{keyed.url}/v1/readings?key={key}", json=reading())
        asyncio.run(ws_status(f"{keyed.ws_url}?key={key}"))
    log = keyed.log()
    assert "API keys required: 5 keys configured" in log
    for key in ALL_KEYS:
        assert key not in log
        assert key[:12] not in log


def test_open_mode_warns_once(server_factory) -> None:
    """With no keys, everything is allowed and one warning says the service is open."""
    srv: Server = server_factory(workers="1", log_level="info")
    assert httpx.post(f"{srv.url}/v1/readings", json=reading()).status_code == 202
    assert httpx.get(f"{srv.url}/v1/sensors").status_code == 200
    assert asyncio.run(ws_status(srv.ws_url)) == 101
    warnings = [line for line in srv.log().splitlines() if "no API keys set" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0]


def test_rate_limit_answers_429_with_retry_after(server_factory) -> None:
    """Past its burst, a key gets 429 with Retry-After; another key is not affected."""
    srv: Server = server_factory(
        workers="1", api_keys=f"{INGEST}:ingest,{EVERYTHING}", rate_limit_per_s="1",
        rate_limit_burst="5",
    )  # fmt: skip
    with httpx.Client(base_url=srv.url) as client:
        statuses = [
            client.post("/v1/readings", json=reading(), headers=bearer(INGEST)) for _ in range(8)
        ]
        other = client.post("/v1/readings", json=reading(), headers=bearer(EVERYTHING))
    codes = [r.status_code for r in statuses]
    assert codes[:5] == [202] * 5 and 429 in codes[5:], codes
    limited = next(r for r in statuses if r.status_code == 429)
    assert int(limited.headers["retry-after"]) >= 1
    assert "rate limit" in limited.json()["detail"]
    assert other.status_code == 202


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"SENSORCAST_API_KEYS": "tooshort:ingest"}, "SENSORCAST_API_KEYS: entry 1"),
        ({"SENSORCAST_API_KEYS": f"{INGEST}:ingest+root"}, "unknown scope 'root'"),
        ({"SENSORCAST_API_KEYS_FILE": "/nonexistent/keys"}, "SENSORCAST_API_KEYS_FILE"),
        ({"SENSORCAST_ALLOWED_ORIGINS": "evil.example"}, "SENSORCAST_ALLOWED_ORIGINS"),
    ],
)
def test_bad_access_settings_stop_startup(tmp_path: Path, env: dict[str, str], needle: str) -> None:
    """A malformed key, scope, keys file or origin stops start-up with one line, key unshown."""
    out = subprocess.run(
        [sys.executable, "-m", "app", "serve"],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr
    assert "tooshort" not in lines[0] and INGEST not in lines[0]
