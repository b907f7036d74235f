"""POST /v1/readings: check the key, read the body within bounds, validate the whole
request, admit it whole, answer 202.

The checks run cheapest first, so that a request refused for its key, its content type or
its declared size costs no body read, and one refused for overload costs no parse.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, NamedTuple

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope as AsgiScope, Send

from app.access import Scope
from app.api.auth import Guard, header_key, require
from app.api.deps import Ingest
from app.config import Settings
from app.metrics import REFUSAL_BY_STATUS, Metrics
from app.pipeline.ingest import BodyBudget, Overloaded, SensorLimitReached
from app.pipeline.pipeline import Pipeline
from app.schemas import (
    Accepted,
    BodyError,
    ErrorBody,
    InvalidBody,
    InvalidItems,
    Limits,
    Reading,
    TooLarge,
    json_steps,
    ndjson_steps,
    reading_schema,
)
from app.turns import turn

Parser = Callable[..., Iterator[list[Reading]]]
"""A body's readings in steps (:func:`~app.schemas.json_steps`)."""

log = logging.getLogger(__name__)

PATH = "/v1/readings"

router = APIRouter(tags=["readings"])

_schema = reading_schema()

JSON_TYPES = {b"application/json"}
NDJSON_TYPES = {b"application/x-ndjson", b"application/ndjson", b"application/jsonl"}

HEAVY_BODY_BYTES = 16_384
"""A body this large (about 200 readings) is parsed in steps, each under a turn
(:mod:`app.turns`)."""


class Answer(NamedTuple):
    """A response to POST /v1/readings, made without the framework's objects."""

    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()


_JSON = (b"content-type", b"application/json")


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> Answer:
    extra = tuple((k.lower().encode(), v.encode()) for k, v in (headers or {}).items())
    return Answer(status, json.dumps({"detail": detail}).encode(), (_JSON, *extra))


async def _read_body(
    declared: bytes | None, chunks: AsyncIterator[bytes], limit: int, budget: BodyBudget
) -> bytes:
    """The body, held under ``budget``; the caller gives back ``len(body)`` bytes when done.

    Raises:
        TooLarge: over ``limit`` bytes, declared or streamed.
        Overloaded: the budget of bodies in memory cannot hold this one now.
    """
    if declared is not None and declared.isdigit():
        size = int(declared)
        if size > limit:
            raise TooLarge(f"body of {size} bytes; the limit is {limit}")
        if not budget.fits(size, size):
            raise Overloaded(retry_after_s=1, reason="too many request bodies in progress")
    parts: list[bytes] = []
    held = 0
    try:
        async for chunk in chunks:
            if held + len(chunk) > limit:
                raise TooLarge(f"body over the limit of {limit} bytes")
            if not budget.take(len(chunk), held + len(chunk)):
                raise Overloaded(retry_after_s=1, reason="too many request bodies in progress")
            held += len(chunk)
            parts.append(chunk)
    except BaseException:
        budget.give_back(held)
        raise
    return b"".join(parts)


async def ingest(
    headers: dict[bytes, bytes], chunks: AsyncIterator[bytes], app_state: Any, state: Any
) -> Answer:
    """The whole of POST /v1/readings on raw headers and body chunks: key, content type,
    body within bounds, parse, admit. Every outcome is an answer (each refusal counted)."""
    settings: Settings = state["settings"]
    metrics: Metrics = app_state.metrics
    guard: Guard = app_state.guard
    if not guard.open:
        key = header_key(headers.get(b"authorization"), headers.get(b"x-api-key"))
        denial = guard.check(key, Scope.ingest)
        if denial is not None:
            metrics.count_refusal(REFUSAL_BY_STATUS.get(denial.status, str(denial.status)))
            return _error(denial.status, denial.detail, denial.headers)
    media_type = headers.get(b"content-type", b"").partition(b";")[0].strip().lower()
    parse: Parser
    if media_type in JSON_TYPES:
        parse = json_steps
    elif media_type in NDJSON_TYPES:
        parse = ndjson_steps
    else:
        shown = media_type[:100].decode("latin-1") or "none"
        metrics.count_refusal("unsupported_media_type")
        return _error(415, f"content type {shown!r}: use application/json or application/x-ndjson")
    budget: BodyBudget = app_state.bodies
    try:
        body = await _read_body(
            headers.get(b"content-length"), chunks, settings.max_body_bytes, budget
        )
    except TooLarge as exc:
        metrics.count_refusal("too_large")
        return _error(413, str(exc))
    except Overloaded as exc:
        metrics.count_refusal("overloaded")
        return _error(503, str(exc), {"Retry-After": str(exc.retry_after_s)})
    try:
        return await _admit(body, parse, state["pipeline"], settings, metrics)
    finally:
        budget.give_back(len(body))


class _ServedRoute(NamedTuple):
    path: str


class IngestEndpoint:
    """POST /v1/readings served straight from ASGI, ahead of the framework's routing,
    request objects and dependency injection: the hottest route pays only for its own work.

    The route below (``post_readings``) documents it in the OpenAPI schema and serves it the
    same way where this endpoint is not installed. Every other request passes through. A
    failure nobody foresaw is logged and answered as the app's last-resort handler answers
    it (``500 {"detail": "internal error"}``), as this endpoint may sit outside that handler
    (see :class:`app.main.Service`).
    """

    def __init__(self, app: ASGIApp, path: str = PATH) -> None:
        self.app = app
        self.path = path
        # What routing would have put in the scope: the request metrics name the route by it.
        self.route = _ServedRoute(path)

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        disconnected = False

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal disconnected
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected = True
                    raise _Disconnected
                yield message.get("body", b"")
                if not message.get("more_body", False):
                    return

        try:
            answer = await ingest(
                dict(scope["headers"]), chunks(), scope["app"].state, scope["state"]
            )
        except _Disconnected:
            answer = Answer(400, b"")  # nobody is left to read it
        except Exception as exc:
            log.error("POST %s failed with %s", self.path, type(exc).__name__, exc_info=exc)
            answer = Answer(500, b'{"detail":"internal error"}', (_JSON,))
        if disconnected and not answer.body:
            return
        await send(
            {"type": "http.response.start", "status": answer.status, "headers": [
                *answer.headers, (b"content-length", str(len(answer.body)).encode()),
            ]}
        )  # fmt: skip
        await send({"type": "http.response.body", "body": answer.body})


class _Disconnected(Exception):
    """The client went away before its body was read."""


@router.post(
    PATH,
    status_code=202,
    dependencies=[require(Scope.ingest)],
    response_model=Accepted,
    summary="Send readings",
    description=(
        "One reading, a JSON array of readings, or NDJSON (one reading per line). "
        "The request is taken whole or not at all."
    ),
    responses={
        400: {"model": ErrorBody, "description": "The body does not parse."},
        401: {"model": ErrorBody, "description": "No API key, or an unknown one."},
        403: {"model": ErrorBody, "description": "The key lacks the ingest scope."},
        413: {"model": ErrorBody, "description": "Over the body or item limit."},
        415: {"model": ErrorBody, "description": "Not JSON or NDJSON."},
        422: {"model": InvalidBody, "description": "Some readings are invalid; each is listed."},
        429: {"model": ErrorBody, "description": "Over the key's rate limit; see Retry-After."},
        507: {
            "model": ErrorBody,
            "description": "New sensors beyond the sensor limit (max_sensors); none taken.",
        },
        503: {"model": ErrorBody, "description": "The pipeline is full; see Retry-After."},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _schema},
                "application/x-ndjson": {"schema": {"type": "string"}},
            },
        }
    },
)
async def post_readings(request: Request) -> Response:
    """Served by :class:`IngestEndpoint`; the same work here where it is not installed."""

    async def chunks() -> AsyncIterator[bytes]:
        async for chunk in request.stream():
            yield chunk

    try:
        answer = await ingest(
            {k.encode("latin-1"): v.encode("latin-1") for k, v in request.headers.items()},
            chunks(),
            request.app.state,
            request.scope["state"],
        )
    except ClientDisconnect:
        return Response(status_code=400)
    return Response(answer.body, status_code=answer.status, headers={
        k.decode("latin-1"): v.decode("latin-1") for k, v in answer.headers
    })  # fmt: skip


async def _admit(
    body: bytes, parse: Parser, pipeline: Ingest, settings: Settings, metrics: Metrics
) -> Answer:
    """Parse and offer a body; every outcome is a response, never an exception (each
    refusal is counted in ``metrics``, by reason)."""
    limits = Limits(
        settings.max_channels, settings.max_sensor_id_chars, settings.max_reading_id_chars
    )
    # A request that finds the queues full is refused, or waits for room (admission_wait_ms)
    # as its bytes, before it is parsed: the "sensor_id" keys count its readings (or more,
    # where it is also a channel name) for a few percent of the parse. One that could never
    # fit is left to the 413 of the parser or the ingestor. Without a wait (the default), the
    # check and the offer stay synchronous.
    deadline = None
    if isinstance(pipeline, Pipeline):
        count = body.count(b'"sensor_id"')
        if settings.admission_wait_ms:
            deadline = asyncio.get_running_loop().time() + settings.admission_wait_ms / 1000
        ingestor = pipeline.ingestor
        fits_ever = count <= min(settings.max_readings_per_request, pipeline.queues[0].capacity)
        if (
            fits_ever
            and not ingestor.has_room(count)
            and (deadline is None or not await ingestor.room_for(count, deadline))
        ):
            metrics.count_refusal("overloaded")
            return _error(503, "the pipeline is full; retry later", {"Retry-After": "1"})
    try:
        steps = parse(body, max_items=settings.max_readings_per_request, limits=limits)
        if len(body) < HEAVY_BODY_BYTES:
            readings = [reading for step in steps for reading in step]
        else:
            readings = []
            while True:
                async with turn():
                    step = next(steps, None)
                if step is None:
                    break
                readings += step
        if not readings:
            metrics.count_refusal("invalid")
            return Answer(422, b'{"detail":"the request holds no readings","errors":[]}', (_JSON,))
        accepted, duplicates = await pipeline.offer(readings, deadline)
    except TooLarge as exc:
        metrics.count_refusal("too_large")
        return _error(413, str(exc))
    except BodyError as exc:
        metrics.count_refusal("bad_body")
        return _error(400, str(exc))
    except InvalidItems as exc:
        metrics.count_refusal("invalid")
        errors = [{"index": e.index, "field": e.field, "reason": e.reason} for e in exc.errors]
        detail = f"{len(errors)} invalid readings; nothing was accepted"
        return Answer(422, json.dumps({"detail": detail, "errors": errors}).encode(), (_JSON,))
    except Overloaded as exc:
        metrics.count_refusal("overloaded")
        return _error(503, str(exc), {"Retry-After": str(exc.retry_after_s)})
    except SensorLimitReached as exc:
        metrics.count_refusal("sensor_limit")
        return _error(507, str(exc))
    metrics.accepted += accepted
    metrics.duplicates += duplicates
    return Answer(202, b'{"accepted":%d,"duplicates":%d}' % (accepted, duplicates), (_JSON,))
