"""POST /v1/readings: check the key, read the body within bounds, validate the whole
request, admit it whole, answer 202.

The checks run cheapest first, so that a request refused for its key, its content type or
its declared size costs no body read, and one refused for overload costs no parse.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from app.access import Scope
from app.api.auth import require
from app.api.deps import Ingest
from app.config import Settings
from app.metrics import Metrics, count_refusal
from app.pipeline.ingest import BodyBudget, Overloaded
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
    parse_json,
    parse_ndjson,
    reading_schema,
)

Parser = Callable[..., list[Reading]]

router = APIRouter(tags=["readings"])

_schema = reading_schema()

JSON_TYPES = {"application/json"}
NDJSON_TYPES = {"application/x-ndjson", "application/ndjson", "application/jsonl"}


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int, budget: BodyBudget) -> bytes:
    """The body, held under ``budget``; the caller gives back ``len(body)`` bytes when done.

    Raises:
        TooLarge: over ``limit`` bytes, declared or streamed.
        Overloaded: the budget of bodies in memory cannot hold this one now.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        size = int(declared)
        if size > limit:
            raise TooLarge(f"body of {size} bytes; the limit is {limit}")
        if budget.used + size > budget.max_bytes:
            raise Overloaded(retry_after_s=1, reason="too many request bodies in progress")
    chunks: list[bytes] = []
    held = 0
    try:
        async for chunk in request.stream():
            if held + len(chunk) > limit:
                raise TooLarge(f"body over the limit of {limit} bytes")
            if not budget.take(len(chunk)):
                raise Overloaded(retry_after_s=1, reason="too many request bodies in progress")
            held += len(chunk)
            chunks.append(chunk)
    except BaseException:
        budget.give_back(held)
        raise
    return b"".join(chunks)


@router.post(
    "/v1/readings",
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
    # The lifespan's objects are read here rather than through dependencies: this is the
    # hottest route, and FastAPI runs plain-function dependencies in its thread pool.
    pipeline: Ingest = request.state.pipeline
    settings: Settings = request.state.settings
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    parse: Parser
    if media_type in JSON_TYPES:
        parse = parse_json
    elif media_type in NDJSON_TYPES:
        parse = parse_ndjson
    else:
        shown = media_type[:100] or "none"
        count_refusal(request, "unsupported_media_type")
        return _error(415, f"content type {shown!r}: use application/json or application/x-ndjson")
    budget: BodyBudget = request.app.state.bodies
    try:
        body = await _read_body(request, settings.max_body_bytes, budget)
    except TooLarge as exc:
        count_refusal(request, "too_large")
        return _error(413, str(exc))
    except Overloaded as exc:
        count_refusal(request, "overloaded")
        return _error(503, str(exc), {"Retry-After": str(exc.retry_after_s)})
    except ClientDisconnect:
        return Response(status_code=400)  # nobody is left to read it
    try:
        return await _admit(body, parse, pipeline, settings, request.app.state.metrics)
    finally:
        budget.give_back(len(body))


async def _admit(
    body: bytes, parse: Parser, pipeline: Ingest, settings: Settings, metrics: Metrics
) -> Response:
    """Parse and offer a body; every outcome is a response, never an exception (each
    refusal is counted in ``metrics``, by reason)."""
    limits = Limits(
        settings.max_channels, settings.max_sensor_id_chars, settings.max_reading_id_chars
    )
    # At saturation most requests are refused. Counting the "sensor_id" keys costs a few
    # percent of parsing, so a request that cannot fit is refused before it is parsed (the
    # key appears once per reading, or more often if it is also a channel name). A request
    # that could never fit is left to the 413 of the parser or the ingestor.
    if isinstance(pipeline, Pipeline):
        count = body.count(b'"sensor_id"')
        queues = pipeline.queues
        fits_ever = count <= min(settings.max_readings_per_request, queues[0].capacity)
        if fits_ever and count > sum(q.free() for q in queues):
            metrics.count_refusal("overloaded")
            return _error(503, "the pipeline is full; retry later", {"Retry-After": "1"})
    try:
        readings = parse(body, max_items=settings.max_readings_per_request, limits=limits)
        if not readings:
            metrics.count_refusal("invalid")
            return JSONResponse(
                {"detail": "the request holds no readings", "errors": []}, status_code=422
            )
        accepted, duplicates = await pipeline.offer(readings)
    except TooLarge as exc:
        metrics.count_refusal("too_large")
        return _error(413, str(exc))
    except BodyError as exc:
        metrics.count_refusal("bad_body")
        return _error(400, str(exc))
    except InvalidItems as exc:
        metrics.count_refusal("invalid")
        errors = [{"index": e.index, "field": e.field, "reason": e.reason} for e in exc.errors]
        return JSONResponse(
            {"detail": f"{len(errors)} invalid readings; nothing was accepted", "errors": errors},
            status_code=422,
        )
    except Overloaded as exc:
        metrics.count_refusal("overloaded")
        return _error(503, str(exc), {"Retry-After": str(exc.retry_after_s)})
    metrics.accepted += accepted
    metrics.duplicates += duplicates
    return Response(
        b'{"accepted":%d,"duplicates":%d}' % (accepted, duplicates),
        status_code=202,
        media_type="application/json",
    )
