"""The edge: connection and subscriber limits, header and body deadlines, the open-file limit.

uvicorn bounds neither the time nor the size of request headers (httptools buffers an
unterminated header line without limit), arms its keep-alive timer only after a first
response, and knows no deadline for a body. :class:`GuardedHttpProtocol` extends its
httptools protocol with those, at the socket where they cost least:

- a connection beyond ``max_connections`` gets ``503`` with ``Retry-After`` once its request
  headers are in (HTTP and WebSocket handshakes alike) and is closed;
- the request line and headers must arrive within ``header_timeout_s`` of the request's
  first byte (of the connection, for the first request; a connection that sends nothing is
  closed after as long), in at most ``max_header_bytes`` and ``max_headers`` fields: else
  ``408`` or ``431`` and the connection is closed, before the app sees anything;
- a body must arrive within ``body_timeout_s`` plus its size at ``body_min_bytes_per_s``:
  else ``408`` (if the app has not answered yet) and the connection is closed, so the
  route's read ends at once and gives back what it held of the body budget.

Idle keep-alive connections are closed by uvicorn's own ``timeout_keep_alive``.
:class:`GuardedWebSocketProtocol` bounds how long a closed WebSocket whose peer reads
nothing keeps its socket: uvicorn's close waits for the send buffer to drain, which such a
peer never lets happen. Every refusal is counted by reason (``/metrics``) and logged at
most once per :data:`LOG_INTERVAL_S` per reason.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from app.config import Settings

log = logging.getLogger(__name__)

LOG_INTERVAL_S = 10.0
"""A refusal reason is logged at most once per this many seconds, with its count since."""
FD_RESERVE = 64
"""Open files kept for everything but client connections (logs, the model dir, Redis)."""
FD_PER_WORKER = 8
"""Pipes and sockets the service holds per model process."""
MAX_CONNECTIONS_DEFAULT = 4096
MAX_SUBSCRIBERS_DEFAULT = 2000
LINGER_S = 1.0
"""After refusing a request, how long its connection's input is read and discarded."""
FRAMES_EXTENSION = "sensorcast.websocket.frames"
"""The ASGI scope extension through which a relay writes pre-encoded frames (see
:meth:`GuardedWebSocketProtocol.write_frames`); absent under another server."""
CLOSE_GRACE_S = 10.0
"""After a WebSocket close, how long a peer has to take the close frame before the socket is
aborted (the ping timeout when one is set)."""

REFUSALS = {
    "connections": "over max_connections (503)",
    "subscribers": "over max_subscribers (503)",
    "subscribers_per_key": "over max_subscribers_per_key (503)",
    "header_timeout": "request headers too slow (408)",
    "header_too_large": "request headers too large (431)",
    "body_timeout": "request body too slow (408)",
    "untrusted_host": "untrusted Host (400)",
}
"""Connections and requests refused at the edge, by reason (exported from the start, at 0)."""


def open_file_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit; return the new soft limit.

    Every connection holds a file descriptor: past the soft limit ``accept`` fails and
    clients are dropped without a word, so the limit is raised as far as allowed and the
    connection limits are sized below it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft if soft != resource.RLIM_INFINITY else target
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
        return soft
    return target


def connection_limits(settings: Settings, open_files: int) -> tuple[int, int]:
    """``(max_connections, max_subscribers)``: the settings, or sized from ``open_files``.

    Examples:
        >>> connection_limits(Settings(workers=2), 1024)
        (944, 472)
        >>> connection_limits(Settings(workers=2), 1_048_576)
        (4096, 2000)
        >>> connection_limits(Settings(max_connections=100, max_subscribers=500), 1024)
        (100, 100)
    """
    room = open_files - FD_RESERVE - FD_PER_WORKER * settings.workers
    connections = settings.max_connections or max(16, min(room, MAX_CONNECTIONS_DEFAULT))
    subscribers = settings.max_subscribers or min(connections // 2, MAX_SUBSCRIBERS_DEFAULT)
    return connections, max(1, min(subscribers, connections))


class RefusalLog:
    """Counts refusals by reason and logs each reason at most once per interval.

    Examples:
        >>> r = RefusalLog(interval_s=60)
        >>> r.count("connections"); r.count("connections")
        >>> r.counts["connections"], r.counts["header_timeout"]
        (2, 0)
    """

    def __init__(self, interval_s: float = LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.counts: dict[str, int] = dict.fromkeys(REFUSALS, 0)
        self._unlogged: dict[str, int] = {}
        self._next_log: dict[str, float] = {}

    def count(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
        now = time.monotonic()
        if now >= self._next_log.get(reason, 0.0):
            log.warning(
                "refused %d connections or requests in the last %.0f s: %s",
                self._unlogged[reason], self.interval_s, REFUSALS.get(reason, reason),
            )  # fmt: skip
            self._unlogged[reason] = 0
            self._next_log[reason] = now + self.interval_s


class SubscriberSlots:
    """WebSocket subscribers held at once, in all and per API key.

    Examples:
        >>> slots = SubscriberSlots(max_total=2, max_per_key=1)
        >>> slots.acquire(b"k1"), slots.acquire(b"k1"), slots.acquire(b"k2"), slots.acquire(None)
        (None, 'subscribers_per_key', None, 'subscribers')
        >>> slots.release(b"k1"); slots.acquire(None)
    """

    def __init__(self, max_total: int, max_per_key: int | None) -> None:
        self.max_total = max_total
        self.max_per_key = max_per_key
        self.total = 0
        self.per_key: dict[bytes, int] = {}

    def acquire(self, key: bytes | None) -> str | None:
        """Take a slot; None when taken, else the refusal reason (nothing taken)."""
        if self.total >= self.max_total:
            return "subscribers"
        if key is not None and self.max_per_key is not None:
            held = self.per_key.get(key, 0)
            if held >= self.max_per_key:
                return "subscribers_per_key"
            self.per_key[key] = held + 1
        self.total += 1
        return None

    def release(self, key: bytes | None) -> None:
        self.total -= 1
        if key is not None and key in self.per_key:
            held = self.per_key[key] - 1
            if held:
                self.per_key[key] = held
            else:
                del self.per_key[key]


class Edge:
    """The limits of one service process, shared by its protocols and its app."""

    def __init__(self, settings: Settings, open_files: int | None = None) -> None:
        if open_files is None:
            open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.settings = settings
        self.open_files = open_files
        self.max_connections, self.max_subscribers = connection_limits(settings, open_files)
        self.refusals = RefusalLog()
        self.slots = SubscriberSlots(self.max_subscribers, settings.max_subscribers_per_key)

    def protocols(self) -> tuple[type[asyncio.Protocol], type[asyncio.Protocol]]:
        """The HTTP and WebSocket protocol classes to give uvicorn, bound to these limits."""
        edge = self

        class Http(GuardedHttpProtocol):
            pass

        class WebSocket(GuardedWebSocketProtocol):
            pass

        Http.edge = edge
        WebSocket.edge = edge
        return Http, WebSocket


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request that was refused."""


def _response(status: int, phrase: str, detail: str, headers: dict[str, str]) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    lines = [f"HTTP/1.1 {status} {phrase}", "content-type: application/json"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines += [f"content-length: {len(body)}", "connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


ONE_WRITE_ROUTES = frozenset({("POST", "/v1/readings")})
"""Routes whose response (status line, headers, one short body) goes out in one write."""


class _OneWrite:
    """The transport as one response sees it: the status line and headers are held until the
    body comes, and both go out in one write.

    uvicorn writes them as two: on loopback and in virtual machines a system call (and the
    wakeup of the peer it causes) costs more than the rest of a single-reading POST's own work.
    Only for a response known to send a body message after its start (see
    ``ONE_WRITE_ROUTES``): a ``100 Continue`` goes out at once, and closing writes what is held
    first, so nothing is lost or reordered.
    """

    __slots__ = ("_transport", "_head", "_held")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._head: bytes | None = None
        self._held = False

    def write(self, data: bytes) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.write(head + data)
        elif not self._held and not data.startswith(b"HTTP/1.1 100 "):
            self._held = True
            self._head = data
        else:
            self._transport.write(data)

    def close(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.write(head)
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with connection, header and body limits (see the module
    docstring). Subclassed per :class:`Edge` by :meth:`Edge.protocols`."""

    edge: ClassVar[Edge]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = self.edge.settings
        self._header_timeout_s = settings.header_timeout_s
        self._max_header_bytes = settings.max_header_bytes
        self._max_headers = settings.max_headers
        self._timer: asyncio.TimerHandle | None = None
        self._in_headers = True
        self._header_bytes = 0
        """Bytes of header fields parsed (names and values)."""
        self._raw_bytes = 0
        """Bytes received while the headers are incomplete: what httptools buffers."""
        self._header_count = 0
        self._over_limit = False
        self._refused = False

    # -- timers -----------------------------------------------------------------------------

    def _arm(self, delay_s: float, callback: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(delay_s, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _refuse(
        self, reason: str, status: int, phrase: str, detail: str, headers: dict[str, str]
    ) -> None:
        """Answer ``status`` and close; the app never sees the request."""
        self._disarm()
        self._refused = True
        self.edge.refusals.count(reason)
        self._answer_and_close(_response(status, phrase, detail, headers))

    def _answer_and_close(self, response: bytes) -> None:
        # Closing a socket with unread input resets it, and a reset can destroy the answer
        # before the client reads it: send, half-close, discard what still comes in, and
        # close a moment later.
        transport = self.transport
        if transport.is_closing():
            return
        transport.write(response)
        if transport.can_write_eof():
            transport.write_eof()
            self._timer = self.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()

    def _header_deadline(self) -> None:
        self._timer = None
        if self._raw_bytes or self._header_bytes or self.cycle is not None:
            detail = f"request headers not received within {self._header_timeout_s:g} s"
            self._refuse("header_timeout", 408, "Request Timeout", detail, {})
        else:
            # Nothing sent at all: no one to answer, just free the socket.
            self._refused = True
            self.edge.refusals.count("header_timeout")
            self.transport.close()

    def _body_deadline(self) -> None:
        self._timer = None
        self.edge.refusals.count("body_timeout")
        self._refused = True
        cycle = self.cycle
        answer = cycle is not None and not cycle.response_started
        if cycle is not None:
            # The route's read ends now (and gives back its body budget); its answer, if
            # any, goes nowhere.
            cycle.disconnected = True
            cycle.message_event.set()
        if answer:
            settings = self.edge.settings
            detail = (
                f"request body not received in time ({settings.body_timeout_s:g} s plus "
                f"{settings.body_min_bytes_per_s} bytes/s)"
            )
            self._answer_and_close(_response(408, "Request Timeout", detail, {}))
        else:
            self.transport.close()

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._over_limit = len(self.connections) > self.edge.max_connections
        self._arm(self._header_timeout_s, self._header_deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # uvicorn's, with refusals that stop parsing quietly (an invalid request is answered
        # 400 as before, without a log line per request anyone could send).
        if self._refused:
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if not self._refused:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if not self._refused:
                self._disarm()
                self.send_400_response("Invalid HTTP request received.")
            return
        if self._in_headers and not self._refused:
            # Bytes of a request whose headers are still incomplete: httptools holds them.
            self._raw_bytes += len(data)
            if self._raw_bytes > self._max_header_bytes:
                self._too_large()

    def _too_large(self) -> None:
        detail = (
            f"request headers over {self._max_header_bytes} bytes or {self._max_headers} fields"
        )
        self._refuse("header_too_large", 431, "Request Header Fields Too Large", detail, {})

    # -- parser callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._header_bytes = 0
        self._raw_bytes = 0
        self._header_count = 0
        if self._timer is None:
            self._arm(self._header_timeout_s, self._header_deadline)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_bytes += len(name) + len(value)
        if self._header_count > self._max_headers or self._header_bytes > self._max_header_bytes:
            self._too_large()
            raise _Refused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._disarm()
        if len(self.url) + self._header_bytes > self._max_header_bytes:
            self._too_large()
            raise _Refused
        if self._over_limit:
            self._refuse(
                "connections", 503, "Service Unavailable",
                f"too many connections (over {self.edge.max_connections}); retry later",
                {"retry-after": "5"},
            )  # fmt: skip
            raise _Refused
        super().on_headers_complete()
        # No path (nor cycle) yet for a WebSocket upgrade, which the protocol hands over.
        if (self.scope["method"], self.scope.get("path")) in ONE_WRITE_ROUTES:
            # The cycle just made; its ASGI task has not run yet.
            self.cycle.transport = _OneWrite(self.transport)  # type: ignore[assignment]
        length = -1
        for name, value in self.headers:
            if name == b"content-length":
                length = int(value) if value.isdigit() else 0
                break
            if name == b"transfer-encoding":
                length = self.edge.settings.max_body_bytes
        if length > 0:
            settings = self.edge.settings
            budget_s = settings.body_timeout_s + length / settings.body_min_bytes_per_s
            self._arm(budget_s, self._body_deadline)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol with bounded send buffers and a bounded close.

    - The kernel holds at most ``ws_send_buffer_bytes`` unsent (``TCP_NOTSENT_LOWAT``; bytes
      sent and awaiting their acknowledgement are not counted, so a fast peer far away keeps
      its throughput) and so does the transport: a peer that reads nothing pauses its relay
      after a few dozen KiB rather than after the megabytes that the kernel's send-buffer
      autotuning would take, each of them one frame encoded and written.
    - A close sent while the peer takes nothing goes behind what is buffered without
      waiting for room, and the socket is aborted ``ws_stall_timeout_s`` later (the peer has
      as long again to take it).
    - A closed socket whose peer never took the close is aborted a ping timeout after it
      was closed (a plain close waits for the send buffer to drain, which such a peer never
      lets happen).
    """

    edge: ClassVar[Edge | None] = None
    _abort_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.edge is not None:
            limit = self.edge.settings.ws_send_buffer_bytes
            _limit_unsent(self.transport, limit)
            self.transport.set_write_buffer_limits(high=limit)

    def _abort_later(self, grace_s: float | None = None) -> None:
        if self._abort_timer is None and not self.disconnected:
            if grace_s is None:
                grace_s = self.config.ws_ping_timeout or CLOSE_GRACE_S
            self._abort_timer = self.loop.call_later(grace_s, self._abort)

    def _abort(self) -> None:
        if not self.disconnected:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        super().connection_lost(exc)

    def keepalive_timeout(self) -> None:
        super().keepalive_timeout()
        self._abort_later()

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][FRAMES_EXTENSION] = {
                "write": self.write_frames,
                "write_now": self.write_frames_now,
            }

    async def write_frames(self, data: bytes) -> bool:
        """Write whole server frames encoded by :func:`app.pipeline.wire.text_frames`, once
        the transport has room: the relay's fast path, one write for many frames and no
        per-frame ASGI call.

        Returns False, having written nothing, when the frames cannot go this way (an
        extension such as permessage-deflate was negotiated, or the connection is closing):
        the caller sends them as ASGI messages instead, which says what went wrong.
        """
        await self.writable.wait()
        return self.write_frames_now(data)

    def write_frames_now(self, data: bytes) -> bool:
        """:meth:`write_frames` without waiting: False (nothing written) when the transport
        has no room now, as ``websockets``' ``broadcast()`` skips a paused connection."""
        if (
            not self.writable.is_set()
            or self.disconnected
            or self.close_sent
            or not self.handshake_complete
            or self.initial_response is not None
            or self.conn.extensions
            or self.transport.is_closing()
        ):
            return False
        self.transport.write(data)
        return True

    async def send(self, message: Any) -> None:
        if message["type"] == "websocket.close" and not self.writable.is_set():
            # The peer takes nothing: waiting for room would wait for ever. The close frame
            # is queued behind the data (which a peer that reads again gets first).
            self.writable.set()
            try:
                await super().send(message)
            finally:
                if not self.disconnected:
                    self.writable.clear()
            self._abort_later(self.edge.settings.ws_stall_timeout_s if self.edge else None)
            return
        await super().send(message)

    async def run_asgi(self) -> None:
        try:
            await super().run_asgi()
        finally:
            self._abort_later()


def _limit_unsent(transport: asyncio.BaseTransport, limit: int) -> None:
    """Bound the bytes the kernel holds unsent for ``transport``'s TCP socket (Linux, macOS)."""
    option = getattr(socket, "TCP_NOTSENT_LOWAT", 25 if sys.platform == "linux" else None)
    sock = transport.get_extra_info("socket")
    if option is None or sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, option, limit)
    except OSError as exc:  # an older kernel: the transport's own bound still holds
        log.debug("cannot set TCP_NOTSENT_LOWAT: %s", exc)
