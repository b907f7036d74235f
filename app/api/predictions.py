"""WS /v1/ws/predictions: live predictions, filtered, resumable.

The route has two parts. The handshake parses the query and refuses what it cannot serve
with an HTTP status before ``accept`` (checks such as API keys belong there too). After it,
a :class:`Connection` runs two tasks: a relay that moves frames from the subscriber's
bounded queue to the socket (so only this client waits on its network), and a reader of
client frames (filter changes and the close).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse
from starlette.datastructures import QueryParams
from starlette.types import Send
from starlette.websockets import WebSocketDisconnect

from app.access import Scope
from app.api.auth import guard_of, key_id, websocket_denial, websocket_key
from app.api.deps import WsHubDep
from app.edge import FRAMES_EXTENSION, Edge
from app.metrics import Metrics
from app.pipeline.hub import SNAPSHOT_SLICE, PredictionHub, SensorFilter, Subscriber
from app.pipeline.wire import Message, client_frames, text_frames
from app.schemas import SENSOR_ID_PATTERN

log = logging.getLogger(__name__)

router = APIRouter(tags=["predictions"])

CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_LATER = 1013

WRITE_BYTES = 64 * 1024
"""Frames written to the socket at once by the relay's fast path (about, in characters)."""

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_PATTERN_CHARS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-*?[]!"
)
_EPOCH_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-")


class BadQuery(ValueError):
    """A query parameter or client frame that cannot be served; the message says why."""


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
    if len(values) > 1000:
        raise BadQuery("at most 1000 sensor filters")
    for value in values:
        if not 1 <= len(value) <= 128 or not _PATTERN_CHARS.issuperset(value):
            raise BadQuery(f"sensor {value!r}: an id ({SENSOR_ID_PATTERN}) or a glob with * ? [ ]")
    return values


def _since(value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or len(value) > 19:
        raise BadQuery(f"since must be a non-negative integer seq, not {value!r}")
    return int(value)


def _epoch(value: str | None) -> str | None:
    if value is None:
        return None
    if not 1 <= len(value) <= 64 or not _EPOCH_CHARS.issuperset(value):
        raise BadQuery(f"epoch {value!r} is not an epoch this service would have sent")
    return value


@dataclass(frozen=True)
class Query:
    """The parsed query of a subscription.

    Examples:
        >>> from starlette.datastructures import QueryParams
        >>> q = Query.parse(QueryParams("sensor=pump-*&since=7&epoch=e1&batch=true"))
        >>> q.filter.sensors, q.since, q.epoch, q.batch, q.snapshot
        (['pump-*'], 7, 'e1', True, False)
        >>> Query.parse(QueryParams("since=-1"))
        Traceback (most recent call last):
        ...
        app.api.predictions.BadQuery: since must be a non-negative integer seq, not '-1'
    """

    filter: SensorFilter
    since: int | None
    epoch: str | None
    snapshot: bool
    batch: bool

    @classmethod
    def parse(cls, params: QueryParams) -> Query:
        """Raises:
        BadQuery: naming the first parameter that is wrong."""
        return cls(
            filter=SensorFilter(
                _sensors(params.getlist("sensor")),
                _flag(params.get("anomalies_only"), "anomalies_only"),
            ),
            since=_since(params.get("since")),
            epoch=_epoch(params.get("epoch")),
            snapshot=_flag(params.get("snapshot"), "snapshot"),
            batch=_flag(params.get("batch"), "batch"),
        )


@router.websocket("/v1/ws/predictions")
async def predictions(websocket: WebSocket, hub: WsHubDep) -> None:
    """Stream predictions. See the README for the query parameters and frames."""
    # Handshake: every refusal is an HTTP response before accept.
    denial = websocket_denial(websocket, Scope.subscribe)
    if denial is not None:
        await _deny(websocket, denial.status, denial.detail)
        return
    try:
        query = Query.parse(websocket.query_params)
    except BadQuery as exc:
        await _deny(websocket, 400, str(exc))
        return
    if hub.closing:
        await _deny(websocket, 503, "server shutting down")
        return
    if not hub.listening:
        await _deny(
            websocket, 503, "the prediction stream is not reachable yet; retry later",
            {"Retry-After": "1"},
        )  # fmt: skip
        return
    edge: Edge = websocket.app.state.edge
    owner = None if guard_of(websocket.app).open else key_id(websocket_key(websocket))
    refusal = edge.slots.acquire(owner)
    if refusal is not None:
        edge.refusals.count(refusal)
        limit = "subscribers" if refusal == "subscribers" else "subscribers for this API key"
        await _deny(
            websocket, 503, f"too many {limit} connected; retry later", {"Retry-After": "5"}
        )
        return
    metrics: Metrics = websocket.app.state.metrics
    try:
        await websocket.accept()
        metrics.ws_accepted += 1
        metrics.ws_open += 1
        try:
            await Connection(websocket, hub, query).run()
        finally:
            metrics.ws_open -= 1
    finally:
        edge.slots.release(owner)


async def _deny(
    websocket: WebSocket, status: int, detail: str, headers: dict[str, str] | None = None
) -> None:
    """Refuse the handshake with an HTTP response where the server supports it (counted
    in the app's metrics by reason)."""
    metrics: Metrics = websocket.app.state.metrics
    metrics.count_ws_refusal(status)
    try:
        await websocket.send_denial_response(
            JSONResponse({"detail": detail}, status_code=status, headers=headers)
        )
    except RuntimeError:
        await websocket.close(CLOSE_POLICY, detail[:120])


_AFTER_CLOSE = "after sending 'websocket.close'"


def _dumps(frame: dict[str, Any]) -> str:
    return json.dumps(frame, separators=(",", ":"))


class Connection:
    """One accepted subscriber socket."""

    def __init__(self, websocket: WebSocket, hub: PredictionHub, query: Query) -> None:
        self.websocket = websocket
        self.hub = hub
        self.query = query
        # The relay owns the socket once accepted, so it calls the ASGI send directly and
        # skips Starlette's per-message state checks: this is the per-frame hot path.
        self._asgi_send: Send = websocket._send
        self._send: Send = self._send_frame
        frames = websocket.scope.get("extensions", {}).get(FRAMES_EXTENSION)
        self._write_frames: Callable[[bytes], Awaitable[bool]] | None = (
            frames["write"] if frames else None
        )
        self._write_now: Callable[[bytes], bool] | None = frames["write_now"] if frames else None
        self.sub: Subscriber | None = None
        self._last_seq = query.since or 0
        """The seq of the last message sent: where this client may resume."""
        self._relay: asyncio.Task[None] | None = None
        self.stalled = False
        """Set when the hub found the socket taking nothing for its stall timeout."""

    async def _send_frame(self, message: MutableMapping[str, Any]) -> None:
        # The server may have closed the socket on its own (a keepalive ping unanswered, a
        # protocol error) before telling the app: a send then is the peer gone, not a bug.
        try:
            await self._asgi_send(message)
        except RuntimeError as exc:
            if _AFTER_CLOSE in str(exc):
                raise WebSocketDisconnect(1006) from None
            raise
        self._socket_took()

    def _socket_took(self) -> None:
        """The socket took what was written: the stall clock starts again."""
        sub = self.sub
        if sub is not None and sub.busy_since is not None:
            sub.busy_since = time.monotonic()

    async def send_text(self, text: str) -> None:
        await self._send({"type": "websocket.send", "text": text})

    async def send_messages(self, messages: list[Message]) -> None:
        """Send messages in order: one frame each, or ``predictions`` frames with batch.

        Under the service's own server the frames are encoded here and written many at a
        time (:data:`WRITE_BYTES`); elsewhere, or with an extension such as
        permessage-deflate, each is one ASGI message.
        """
        frames = client_frames(messages, self.query.batch)
        write = self._write_frames
        pending: list[tuple[str, int]] = []
        while write is not None:
            size = 0
            for frame in frames:
                pending.append(frame)
                size += len(frame[0])
                if size >= WRITE_BYTES:
                    break
            if not pending:
                return
            if not await write(text_frames([text for text, _ in pending])):
                self._write_frames = None
                break
            self._last_seq = pending[-1][1]
            pending = []
            self._socket_took()
        send = self._send
        for text, seq in itertools.chain(pending, frames):
            await send({"type": "websocket.send", "text": text})
            self._last_seq = seq

    def _direct(self, data: bytes, last_seq: int) -> bool:
        """The hub's direct write while the relay is idle (see :attr:`Subscriber.direct`)."""
        write_now = self._write_now
        if write_now is not None and write_now(data):
            self._last_seq = last_seq
            return True
        return False

    async def run(self) -> None:
        """Serve the connection until the peer goes, the server closes, or the socket stalls."""
        hub, query = self.hub, self.query
        subscription = hub.subscribe(
            query.filter, query.since, query.epoch, query.snapshot, query.batch
        )
        sub = self.sub = subscription.subscriber
        hello = _dumps({"type": "hello", "epoch": hub.epoch, "seq": hub.latest_seq})
        relay = asyncio.create_task(
            self.relay(
                hello,
                subscription.snapshot,
                subscription.gap,
                subscription.replay,
                subscription.alarms,
            ),
            name="ws-relay",
        )
        reader = asyncio.create_task(self.read(), name="ws-read")
        self._relay = relay
        sub.on_stall = self._on_stall
        tasks = [relay, reader]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = None if task.cancelled() else task.exception()
                if error is not None and not isinstance(error, WebSocketDisconnect | OSError):
                    log.warning("subscriber ended with %r", error)
        finally:
            hub.unsubscribe(sub)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
        if self.stalled:
            await self._close_stalled()

    def _on_stall(self) -> None:
        """Called by the hub's reaper: the relay stops, and :meth:`run` closes with 1013."""
        self.stalled = True
        if self._relay is not None:
            self._relay.cancel()

    async def _close_stalled(self) -> None:
        # The relay and the reader are done: this close is the last frame. The edge's
        # protocol queues it behind the unsent data and aborts the socket shortly after.
        timeout_s = self.hub.stall_timeout_s
        reason = f"stalled: took nothing for {timeout_s:g} s; resume with since={self._last_seq}"
        with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError, TimeoutError):
            async with asyncio.timeout(1.0):
                await self._send(
                    {"type": "websocket.close", "code": CLOSE_TRY_LATER, "reason": reason}
                )

    async def relay(
        self,
        hello: str,
        snapshot: list[str],
        gap: dict[str, Any] | None,
        replay: list[Message],
        alarms: list[str],
    ) -> None:
        """Send what the subscription is owed, then move frames from the queue to the socket
        until the hub closes or the peer goes."""
        sub = self.sub
        assert sub is not None
        sub.busy_since = time.monotonic()
        await self.send_text(hello)
        # A snapshot of many sensors goes in slices, letting other tasks run in between.
        for start in range(0, len(snapshot), SNAPSHOT_SLICE):
            if start:
                await asyncio.sleep(0)
            chunk = snapshot[start : start + SNAPSHOT_SLICE]
            for frame in self.hub.snapshot_frames(chunk, sub.filter):
                await self.send_text(frame)
        for frame in alarms:
            await self.send_text(frame)
        if gap is not None:
            await self.send_text(_dumps(gap))
        await self.send_messages(replay)
        del snapshot, replay
        wake = sub.wake
        while True:
            sub.busy_since = None
            if not wake.is_set() and self._write_frames is not None:
                sub.direct = self._direct
            await wake.wait()
            sub.direct = None
            # From here until the next wait, a socket that takes nothing for the stall
            # timeout gets reaped (each frame it takes starts the clock again).
            sub.busy_since = time.monotonic()
            if sub.overflowed:
                reason = f"too slow; resume with since={self._last_seq}"
                await self.websocket.close(CLOSE_TRY_LATER, reason)
                return
            messages = sub.take()
            if sub.dropped:
                dropped, sub.dropped = sub.dropped, 0
                await self.send_text(_dumps({"type": "lagged", "dropped": dropped}))
            if messages:
                await self.send_messages(messages)
            if self.hub.closing and not sub.queued:
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
        """A ``subscribe`` frame replaces the filter; anything else gets an ``error`` frame."""
        try:
            message = json.loads(text)
            new_filter = self.parse_subscribe(message)
        except (ValueError, BadQuery) as exc:
            reason = str(exc) if isinstance(exc, BadQuery) else "not valid JSON"
            await self.send_text(_dumps({"type": "error", "reason": reason}))
            return
        sub = self.sub
        assert sub is not None
        # Swap the filter and purge what the new one does not want in one step: every
        # frame numbered above the seq in the reply follows the new filter.
        sub.filter = new_filter
        sub.retain(new_filter.wants)
        await self.send_text(
            _dumps(
                {
                    "type": "subscribed",
                    "sensors": new_filter.sensors,
                    "anomalies_only": new_filter.anomalies_only,
                    "seq": self.hub.latest_seq,
                }
            )
        )

    @staticmethod
    def parse_subscribe(message: object) -> SensorFilter:
        """The filter a ``subscribe`` frame asks for.

        Raises:
            BadQuery: the frame is not a well-formed ``subscribe``.
        """
        if not isinstance(message, dict) or message.get("type") != "subscribe":
            raise BadQuery('expected {"type": "subscribe", "sensors": [...]}')
        unknown = set(message) - {"type", "sensors", "sensor", "anomalies_only"}
        if unknown:
            raise BadQuery(f"unknown fields: {', '.join(sorted(unknown))}")
        sensors = message.get("sensors", message.get("sensor", []))
        if isinstance(sensors, str):
            sensors = [sensors]
        if not isinstance(sensors, list) or not all(isinstance(s, str) for s in sensors):
            raise BadQuery("sensors must be a list of ids or globs")
        anomalies_only = message.get("anomalies_only", False)
        if not isinstance(anomalies_only, bool):
            raise BadQuery("anomalies_only must be true or false")
        return SensorFilter(_sensors(sensors), anomalies_only)
