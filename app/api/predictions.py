"""WS /v1/ws/predictions: live predictions, filtered, resumable.

Each connection has two tasks: a relay that moves frames from the subscriber's bounded queue
to the socket (so only this client waits on its network), and a reader of client frames
(filter changes and the close).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse
from starlette.websockets import WebSocketDisconnect

from app.api.auth import Scope, websocket_denial
from app.api.deps import WsHubDep
from app.pipeline.hub import PredictionHub, SensorFilter, Subscriber
from app.pipeline.publish import Message
from app.schemas import SENSOR_ID_PATTERN

log = logging.getLogger(__name__)

router = APIRouter(tags=["predictions"])

CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_LATER = 1013

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_PATTERN_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-*?[]!")


class BadQuery(ValueError):
    pass


def _flag(value: str | None, name: str) -> bool:
    if value is None:
        return False
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise BadQuery(f"{name} must be true or false, not {value!r}")


def _sensors(values: list[str]) -> list[str]:
    for value in values:
        if not 1 <= len(value) <= 128 or not set(value) <= _PATTERN_CHARS:
            raise BadQuery(f"sensor {value!r}: an id ({SENSOR_ID_PATTERN}) or a glob with * ? [ ]")
    return values


def _since(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isdigit():
        raise BadQuery(f"since must be a non-negative integer seq, not {value!r}")
    return int(value)


def _hello(hub: PredictionHub) -> str:
    return json.dumps({"type": "hello", "epoch": hub.epoch, "seq": hub.latest_seq})


def _gap(hub: PredictionHub, first: int, last: int) -> str:
    return json.dumps(
        {"type": "gap", "epoch": hub.epoch, "from_seq": first, "to_seq": last,
         "missed": last - first + 1, "reason": "no longer kept"}
    )  # fmt: skip


class Connection:
    """One subscriber's socket."""

    def __init__(self, websocket: WebSocket, hub: PredictionHub, batch: bool) -> None:
        self.websocket = websocket
        self.hub = hub
        self.batch = batch
        self.sub: Subscriber | None = None

    async def send_text(self, text: str) -> None:
        await self.websocket.send({"type": "websocket.send", "text": text})

    async def send_messages(self, messages: list[Message]) -> None:
        if not messages:
            return
        if not self.batch:
            send = self.websocket.send
            for m in messages:
                await send({"type": "websocket.send", "text": m.frame})
            return
        run: list[str] = []
        for m in messages:
            if m.kind == "prediction":
                run.append(m.frame)
                continue
            if run:
                await self.send_text('{"type":"predictions","items":[' + ",".join(run) + "]}")
                run = []
            await self.send_text(m.frame)
        if run:
            await self.send_text('{"type":"predictions","items":[' + ",".join(run) + "]}")

    async def relay(self) -> None:
        """Move frames from the queue to the socket until the hub closes or the peer goes."""
        sub = self.sub
        assert sub is not None
        while True:
            await sub.wake.wait()
            if sub.overflowed:
                await self.websocket.close(
                    CLOSE_TRY_LATER, "subscriber too slow; reconnect with since"
                )
                return
            messages = sub.take()
            if sub.dropped:
                dropped, sub.dropped = sub.dropped, 0
                await self.send_text(json.dumps({"type": "lagged", "dropped": dropped}))
            await self.send_messages(messages)
            if self.hub.closing and not sub.queue:
                await self.websocket.close(CLOSE_GOING_AWAY, "server shutting down")
                return

    async def read(self) -> None:
        """Handle client frames until the peer closes."""
        while True:
            event = await self.websocket.receive()
            if event["type"] == "websocket.disconnect":
                return
            if event.get("bytes") is not None:
                await self.websocket.close(CLOSE_UNSUPPORTED, "binary frames are not supported")
                return
            await self.on_text(event.get("text") or "")

    async def on_text(self, text: str) -> None:
        try:
            message = json.loads(text)
            if not isinstance(message, dict) or message.get("type") != "subscribe":
                raise BadQuery('expected {"type": "subscribe", ...}')
            sensors = message.get("sensors", message.get("sensor", []))
            if isinstance(sensors, str):
                sensors = [sensors]
            if not isinstance(sensors, list) or not all(isinstance(s, str) for s in sensors):
                raise BadQuery("sensors must be a list of ids or globs")
            anomalies_only = message.get("anomalies_only", False)
            if not isinstance(anomalies_only, bool):
                raise BadQuery("anomalies_only must be true or false")
            new_filter = SensorFilter(_sensors(sensors), anomalies_only)
        except (ValueError, BadQuery) as exc:
            reason = str(exc) if isinstance(exc, BadQuery) else "not valid JSON"
            await self.send_text(json.dumps({"type": "error", "reason": reason}))
            return
        assert self.sub is not None
        self.sub.filter = new_filter
        await self.send_text(
            json.dumps(
                {
                    "type": "subscribed",
                    "sensors": new_filter.sensors,
                    "anomalies_only": anomalies_only,
                    "seq": self.hub.latest_seq,
                }
            )  # fmt: skip
        )


@router.websocket("/v1/ws/predictions")
async def predictions(websocket: WebSocket, hub: WsHubDep) -> None:
    """Stream predictions. See the README for the query parameters and frames."""
    denial = websocket_denial(websocket, Scope.subscribe)
    if denial is not None:
        await _deny(websocket, denial.status, denial.detail)
        return
    params = websocket.query_params
    try:
        filter = SensorFilter(
            _sensors(params.getlist("sensor")),
            _flag(params.get("anomalies_only"), "anomalies_only"),
        )
        since = _since(params.get("since"))
        snapshot = _flag(params.get("snapshot"), "snapshot")
        batch = _flag(params.get("batch"), "batch")
    except BadQuery as exc:
        await _deny(websocket, 400, str(exc))
        return
    if hub.closing:
        await _deny(websocket, 503, "server shutting down")
        return

    await websocket.accept()
    conn = Connection(websocket, hub, batch)
    sub, replay, gap_from = hub.subscribe(filter, since)
    conn.sub = sub
    tasks: list[asyncio.Task[Any]] = []
    try:
        await conn.send_text(_hello(hub))
        if snapshot:
            for frame in hub.snapshot(filter):
                await conn.send_text(frame)
        if gap_from is not None:
            await conn.send_text(
                _gap(hub, gap_from, replay[0].seq - 1 if replay else hub.latest_seq)
            )
        await conn.send_messages(replay)
        tasks = [
            asyncio.create_task(conn.relay(), name="ws-relay"),
            asyncio.create_task(conn.read(), name="ws-read"),
        ]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            error = task.exception()
            if error is not None and not isinstance(error, WebSocketDisconnect | OSError):
                log.warning("subscriber ended with %s", type(error).__name__)
    except (WebSocketDisconnect, OSError):
        pass
    finally:
        hub.unsubscribe(sub)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


async def _deny(websocket: WebSocket, status: int, detail: str) -> None:
    """Refuse the handshake with an HTTP response where the server supports it."""
    try:
        await websocket.send_denial_response(JSONResponse({"detail": detail}, status_code=status))
    except RuntimeError:
        await websocket.close(CLOSE_POLICY, detail[:120])
