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

import contextvars
import json
import logging
import re
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any

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

_REQUEST_ID_OK = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_SECRET_PARAM = re.compile(r"((?:^|[?&\s])(?:key|api_key|token|access_token)=)[^&\s\"']*", re.I)
_WIRE_DUMPS = ("< ", "> ")
_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# Fields a record may carry through ``extra=`` that JSON lines show as their own keys.
_ACCESS_FIELDS = ("method", "path", "status", "duration_ms")


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


class TextFormatter(logging.Formatter):
    """Readable lines; a record written while a request runs ends with ``[id]``."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        rid = getattr(record, "request_id", "-")
        return line if rid == "-" else f"{line} [{rid}]"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``message``, ``request_id``,
    the access fields when present, and ``exc`` for a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", "-")
        if rid != "-":
            out["request_id"] = rid
        for name in _ACCESS_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"), ensure_ascii=False)


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Send every logger's records to stderr, as readable lines or JSON (``fmt="json"``).

    Replaces the root logger's handlers, so calling it again switches the format.
    """
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
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
    """A random id, 16 hex digits."""
    return secrets.token_hex(8)


def _log_access(scope: Scope, status: int, duration_s: float, rid: str) -> None:
    # The record is built here rather than through Logger.info(): that skips the caller
    # lookup (a stack walk) and the extra-dict merge, about a fifth of an access line's cost.
    duration_ms = round(duration_s * 1e3, 2)
    method = scope.get("method", "WS")
    path = scope["path"]
    record = logging.LogRecord(
        "app.access", logging.INFO, __file__, 0, "%s %s %d %.2fms",
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
