"""Logging: readable lines by default, JSON lines on request, one access line per request.

``configure_logging`` sets up the root logger once per process (uvicorn is told to leave
logging alone, so its lines go through the same handler). ``RequestIdMiddleware`` is a pure
ASGI middleware: it gives every HTTP request and WebSocket connection an id (the incoming
``X-Request-ID`` when it looks sane), returns it as a response header, makes it available
to every log record written while the request runs, and writes the access line.

What never reaches a log: query strings (they may carry ``key=``), headers, and bodies.
Access lines name the path only; uvicorn's own WebSocket lines, which include the query
string, and the wire dumps of its DEBUG level go through :class:`RedactKeys`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import re
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any

import msgspec

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
RequestObserver = Callable[[str, str, int, float], None]
"""Called once per HTTP request with (method, route template, status, duration in s)."""

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
"""The id of the request being served, for log records written meanwhile."""

access_log = logging.getLogger("app.access")

_json = msgspec.json.Encoder().encode
_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_SECRET_PARAM = re.compile(r"((?:^|[?&\s])(?:key|api_key|token|access_token)=)[^&\s\"']*", re.I)
_WIRE_DUMPS = ("< ", "> ")
_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# Fields a record may carry through ``extra=`` that JSON lines show as their own keys.
_ACCESS_FIELDS = ("method", "path", "status", "duration_ms")
_ACCESS_MESSAGE = "%s %s %d %.2fms"
"""An access line's message: method, path, status, duration in ms."""


def redact(text: str) -> str:
    """Mask secret-looking query parameters in a line.

    Examples:
        >>> redact('"WebSocket /v1/ws/predictions?sensor=a&key=s3cret" [accepted]')
        '"WebSocket /v1/ws/predictions?sensor=a&key=***" [accepted]'
        >>> redact("nothing to hide")
        'nothing to hide'
    """
    if "=" not in text:
        return text
    return _SECRET_PARAM.sub(r"\1***", text)


class RedactKeys(logging.Filter):
    """Keeps secrets and payloads out of the log.

    Rewrites a record's message with :func:`redact` (uvicorn logs WebSocket query strings),
    and drops the wire dumps that uvicorn and websockets write at DEBUG (``< header: value``,
    ``> TEXT '...'``): they carry API keys in headers and readings in frames.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "app.access":
            return True  # a path without its query string, nothing else
        if (
            record.levelno == logging.DEBUG
            and isinstance(record.msg, str)
            and record.msg[:2] in _WIRE_DUMPS
            and record.name.startswith(("uvicorn", "websockets"))
        ):
            return False
        message = record.getMessage()
        if "=" in message:
            cleaned = redact(message)
            if cleaned != message:
                record.msg, record.args = cleaned, None
        return True


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (or ``-``) to every record, from the request being served."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get() or "-"
        return True


def _clock(created: float, cache: list[Any]) -> str:
    """``created`` as ``2026-11-26 01:13:11,071`` (local time, as logging's default); the part
    to the second is formatted once per second (``cache`` holds the last one)."""
    second = int(created)
    if second != cache[0]:
        cache[1] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        cache[0] = second
    return f"{cache[1]},{int((created - second) * 1000):03d}"


class TextFormatter(logging.Formatter):
    """Readable lines; a record written while a request runs ends with ``[id]``."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)
        self._second: list[Any] = [-1, ""]

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _clock(record.created, self._second)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        rid = getattr(record, "request_id", "-")
        return line if rid == "-" else f"{line} [{rid}]"

    def access_line(
        self, created: float, method: str, path: str, status: int, ms: float, rid: str
    ) -> str:
        """What :meth:`format` makes of an access record (see :func:`_log_access`)."""
        line = _TEXT_FORMAT % {
            "asctime": _clock(created, self._second),
            "levelname": "INFO",
            "name": access_log.name,
            "message": _ACCESS_MESSAGE % (method, path, status, ms),
        }
        return f"{line} [{rid}]"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``message``, ``request_id``,
    the access fields when present, and ``exc`` for a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {name: getattr(record, name, None) for name in _ACCESS_FIELDS}
        return _json_line(
            record.created,
            record.levelname.lower(),
            record.name,
            record.getMessage(),
            getattr(record, "request_id", "-"),
            {name: value for name, value in fields.items() if value is not None},
            self.formatException(record.exc_info) if record.exc_info else None,
        )

    def access_line(
        self, created: float, method: str, path: str, status: int, ms: float, rid: str
    ) -> str:
        """What :meth:`format` makes of an access record (see :func:`_log_access`)."""
        message = _ACCESS_MESSAGE % (method, path, status, ms)
        fields = {"method": method, "path": path, "status": status, "duration_ms": ms}
        return _json_line(created, "info", access_log.name, message, rid, fields)


def _json_line(
    created: float,
    level: str,
    logger: str,
    message: str,
    rid: str,
    fields: dict[str, Any],
    exc: str | None = None,
) -> str:
    out: dict[str, Any] = {
        "ts": datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds"),
        "level": level,
        "logger": logger,
        "message": message,
    }
    if rid != "-":
        out["request_id"] = rid
    out.update(fields)
    if exc is not None:
        out["exc"] = exc
    return _json(out).decode()


class BatchedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes the INFO and DEBUG lines of an event loop in batches.

    A line written on a thread that runs an asyncio loop is held for at most ``interval_s``
    (or until ``limit_chars`` are held), then everything held goes out in one write: at
    thousands of requests per second, one write per access line would cost the event loop a
    system call each. A warning or an error, and any line written off the loop (start-up,
    shutdown, other threads), is written at once, after what is held, so lines keep their
    order. ``flush()`` (called by ``logging.shutdown`` at exit) writes what is held.
    """

    def __init__(self, stream: Any, *, interval_s: float = 0.1, limit_chars: int = 65_536):
        super().__init__(stream)
        self.interval_s = interval_s
        self.limit_chars = limit_chars
        self._held: list[str] = []
        self._held_chars = 0
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._hold(line, record.levelno)

    def write_info(self, line: str) -> None:
        """Write an INFO line formatted by the caller, as :meth:`emit` would (the access
        lines: see :func:`_log_access`)."""
        self.acquire()
        try:
            self._hold(line, logging.INFO)
        finally:
            self.release()

    def _hold(self, line: str, level: int) -> None:
        line += self.terminator
        self._held.append(line)
        self._held_chars += len(line)
        loop = asyncio.events._get_running_loop()
        if loop is None or level > logging.INFO or self._held_chars >= self.limit_chars:
            self._write_held()
        elif self._timer_loop is not loop:
            self._timer_loop = loop
            loop.call_later(self.interval_s, self._on_timer)

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_held()
        finally:
            self.release()

    def _on_timer(self) -> None:
        self.acquire()
        try:
            self._timer_loop = None
            self._write_held()
        finally:
            self.release()

    def _write_held(self) -> None:
        if not self._held:
            return
        text = "".join(self._held)
        self._held.clear()
        self._held_chars = 0
        try:
            self.stream.write(text)
            if hasattr(self.stream, "flush"):
                self.stream.flush()
        except Exception:
            # As logging does for one record: report on stderr, never raise into the caller.
            self.handleError(logging.makeLogRecord({"msg": text[:200]}))


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Send every logger's records to stderr, as readable lines or JSON (``fmt="json"``).

    Replaces the root logger's handlers, so calling it again switches the format. Lines
    written on the event loop go out in batches (:class:`BatchedStreamHandler`).
    """
    global _access_out
    # No format here shows the thread or process names, which every record would look up.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = BatchedStreamHandler(sys.stderr)
    formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handler.setFormatter(formatter)
    _access_out = (handler, formatter)
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RedactKeys())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        # uvicorn's own dictConfig is skipped (log_config=None); make sure its loggers
        # reach the root handler and do not keep handlers of their own.
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def new_request_id() -> str:
    """A random id, 16 hex digits.

    From the ``random`` module (reseeded in a forked child), not ``secrets``: an id names a
    request in the logs, it guards nothing, and ``secrets`` costs a system call per request.
    """
    return f"{random.getrandbits(64):016x}"


_access_out: tuple[BatchedStreamHandler, TextFormatter | JsonFormatter] | None = None
"""The handler and formatter :func:`configure_logging` installed, which access lines go to
directly."""


def _log_access(scope: Scope, status: int, duration_s: float, rid: str) -> None:
    duration_ms = round(duration_s * 1e3, 2)
    method = scope.get("method", "WS")
    path = scope["path"]
    out = _access_out
    if out is not None and out[0] in logging.root.handlers and not access_log.handlers:
        # The line configure_logging's formatter would make of the record below, made
        # without one: building a LogRecord and passing it through the logger hierarchy,
        # filters and formatter costs several times what the line itself does, on every
        # request.
        handler, formatter = out
        handler.write_info(
            formatter.access_line(time.time(), method, path, status, duration_ms, rid)
        )
        return
    # Without configure_logging (the app served by another server), through logging. The
    # record is built here rather than through Logger.info(): that skips the caller lookup
    # (a stack walk) and the extra-dict merge.
    record = logging.LogRecord(
        access_log.name, logging.INFO, __file__, 0, _ACCESS_MESSAGE,
        (method, path, status, duration_ms), None,
    )  # fmt: skip
    record.method, record.path, record.status = method, path, status
    record.duration_ms, record.request_id = duration_ms, rid
    access_log.handle(record)


def route_of(scope: Scope) -> str:
    """The template of the route that served a request (``/v1/sensors/{sensor_id}``), or
    ``unmatched``: raw paths would make one series per sensor id, or per scanner probe."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else "unmatched"


class RequestIdMiddleware:
    """Request ids, access lines and request metrics, as a pure ASGI middleware (no
    per-request objects beyond a closure, so it costs a few microseconds on the ingest path).

    Args:
        app: the wrapped ASGI app.
        access: write one ``app.access`` line per HTTP request and per WebSocket connection
            (at INFO: method, path, status, duration in ms, request id).
        observe: called once per HTTP request (not WebSocket) with its method, route
            template (see :func:`route_of`), status and duration.
    """

    def __init__(
        self, app: ASGIApp, *, access: bool = True, observe: RequestObserver | None = None
    ) -> None:
        self.app = app
        self.access = access
        self.observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        rid = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _REQUEST_ID_OK.fullmatch(candidate):
                    rid = candidate
                break
        if rid is None:
            rid = new_request_id()
        token = request_id.set(rid)
        header = (b"x-request-id", rid.encode())
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            mtype = message["type"]
            if mtype == "http.response.start" or mtype == "websocket.http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            elif mtype == "websocket.accept":
                status = 101
                message["headers"] = [*message.get("headers", ()), header]
            elif mtype == "websocket.close" and not status:
                status = 403  # closed before the handshake: the server refuses it so
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            status = status or 500
            raise
        finally:
            elapsed = time.perf_counter() - started
            if self.observe is not None and kind == "http":
                self.observe(scope["method"], route_of(scope), status, elapsed)
            if self.access and access_log.isEnabledFor(logging.INFO):
                _log_access(scope, status, elapsed, rid)
            request_id.reset(token)
