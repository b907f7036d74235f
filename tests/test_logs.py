"""Logs: readable or JSON lines, a request id on each access line, no keys or payloads."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from typing import Any

import httpx
import pytest

from app.logs import BatchedStreamHandler, JsonFormatter, TextFormatter
from tests.conftest import Server, collect, connect, post, receive_json

SECRET = "k3y-DO-NOT-LOG-5f2a"
PAYLOAD_SENSOR = "payload-sensor-9b1"
PAYLOAD_ID = "payload-reading-id-77c"


async def wait_for_line(server: Server, needle: str, timeout_s: float = 10) -> str:
    """The server's log once it holds ``needle`` (access lines are written after the reply)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        log = server.log()
        if needle in log:
            return log
        await asyncio.sleep(0.05)
    raise AssertionError(f"{needle!r} never logged:\n{server.log()[-2000:]}")


def json_lines(log: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.splitlines() if line.startswith("{")]


async def test_json_access_lines_with_request_ids(server_factory) -> None:
    """With log_format=json every line is JSON; access lines carry method, path, status,
    duration and the request id, which is honoured from X-Request-ID and returned."""
    server = server_factory(log_level="info", log_format="json")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        given = await http.get("/healthz", headers={"X-Request-ID": "trace-abc.123"})
        assert given.headers["x-request-id"] == "trace-abc.123"
        made = await http.get("/v1/sensors")
        made_id = made.headers["x-request-id"]
        assert len(made_id) == 16
        junk = await http.get("/healthz", headers={"X-Request-ID": "no spaces; allowed"})
        assert junk.headers["x-request-id"] != "no spaces; allowed"
        refused = await http.post(
            "/v1/readings", content=b"{", headers={"content-type": "application/json"}
        )
        assert refused.status_code == 400
    log = await wait_for_line(server, refused.headers["x-request-id"])
    lines = log.strip().splitlines()
    assert all(line.startswith("{") for line in lines), lines
    access = {r["request_id"]: r for r in json_lines(log) if r["logger"] == "app.access"}
    first = access["trace-abc.123"]
    assert (first["method"], first["path"], first["status"]) == ("GET", "/healthz", 200)
    assert first["level"] == "info" and 0 <= first["duration_ms"] < 10_000
    assert access[made_id]["path"] == "/v1/sensors"
    assert access[refused.headers["x-request-id"]]["status"] == 400


async def test_no_keys_or_payloads_in_logs(server_factory) -> None:
    """Query strings (keys), headers and bodies never reach the log, WebSocket lines included."""
    server = server_factory(log_level="debug")
    reading = {"sensor_id": PAYLOAD_SENSOR, "value": 123456.789, "id": PAYLOAD_ID}
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        url = f"{server.ws_url}?key={SECRET}&sensor={PAYLOAD_SENSOR}"
        async with connect(url, additional_headers={"X-API-Key": SECRET}) as ws:
            assert (await receive_json(ws))["type"] == "hello"
            response = await post(http, [reading], params={"key": SECRET})
            assert response.status_code == 202
            bad = await post(http, [{**reading, "value": "x"}], headers={"X-API-Key": SECRET})
            assert bad.status_code == 422
            await collect(ws, 1)
        last = await http.get("/healthz")
    log = await wait_for_line(server, last.headers["x-request-id"])
    assert "WebSocket" in log and "POST /v1/readings 202" in log
    for secret in (SECRET, PAYLOAD_ID, "123456.789"):
        assert secret not in log, f"{secret!r} leaked into the log:\n{log}"


async def test_access_log_can_be_switched_off(server_factory) -> None:
    """access_log=false writes no access lines; responses still carry X-Request-ID."""
    server = server_factory(log_level="info", access_log="false")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        response = await http.get("/healthz")
    assert response.headers["x-request-id"]
    await asyncio.sleep(0.3)
    assert "/healthz" not in server.log()
    assert "ready" in server.log()  # the service's own lines still flow


class _Writes(io.StringIO):
    """A stream that records each write, to see how lines are batched."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.written: asyncio.Event | None = None

    def write(self, text: str) -> int:
        self.writes.append(text)
        if self.written is not None:
            self.written.set()
        return super().write(text)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_access_lines_are_what_the_formatter_makes_of_the_record(fmt: str) -> None:
    """The access line written straight to the handler equals the formatter's rendering of
    the equivalent record, in text and JSON, so the two paths cannot drift apart."""
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    created = 1_790_000_000.25
    record = logging.LogRecord(
        "app.access", logging.INFO, __file__, 0, "%s %s %d %.2fms",
        ("POST", "/v1/readings", 202, 10.81), None,
    )  # fmt: skip
    record.created, record.msecs = created, 250.0
    record.method, record.path, record.status = "POST", "/v1/readings", 202
    record.duration_ms, record.request_id = 10.81, "cf1013c5d42abc55"
    direct = formatter.access_line(created, "POST", "/v1/readings", 202, 10.81, "cf1013c5d42abc55")
    assert direct == formatter.format(record)
    if fmt == "text":
        assert direct.endswith(
            "INFO    app.access: POST /v1/readings 202 10.81ms [cf1013c5d42abc55]"
        )
    else:
        assert json.loads(direct)["duration_ms"] == 10.81


async def test_lines_written_on_the_loop_go_out_together() -> None:
    """INFO lines written on the event loop are held and written in one go; a warning is
    written at once, after what was held, so the order is kept; off the loop, at once."""
    stream = _Writes()
    handler = BatchedStreamHandler(stream, interval_s=0.05)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("tests.batched")
    logger.propagate, logger.level = False, logging.INFO
    logger.addHandler(handler)
    try:
        for n in range(5):
            logger.info("line %d", n)
        assert stream.writes == []
        stream.written = asyncio.Event()
        await asyncio.wait_for(stream.written.wait(), 5)
        stream.written = None
        assert len(stream.writes) == 1 and stream.writes[0].count("\n") == 5
        logger.info("held")
        logger.warning("at once")
        assert len(stream.writes) == 2
        assert stream.writes[1].index("held") < stream.writes[1].index("at once")
        await asyncio.to_thread(logger.info, "from a thread")
        assert "from a thread" in stream.writes[-1]
        logger.info("flushed at exit")
        handler.flush()
        assert "flushed at exit" in stream.getvalue()
    finally:
        logger.removeHandler(handler)
