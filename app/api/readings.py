"""POST /v1/readings: validate the whole request, admit it whole, answer 202."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.api.deps import PipelineDep, SettingsDep
from app.pipeline.ingest import Overloaded
from app.schemas import (
    Accepted,
    BodyError,
    ErrorBody,
    InvalidBody,
    InvalidItems,
    TooLarge,
    parse_json,
    parse_ndjson,
    reading_schema,
)

router = APIRouter(tags=["readings"])

_schema, _ = reading_schema()

JSON_TYPES = {"application/json"}
NDJSON_TYPES = {"application/x-ndjson", "application/ndjson", "application/jsonl"}


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"body of {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"body over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post(
    "/v1/readings",
    status_code=202,
    response_model=Accepted,
    summary="Send readings",
    description=(
        "One reading, a JSON array of readings, or NDJSON (one reading per line). "
        "The request is taken whole or not at all."
    ),
    responses={
        400: {"model": ErrorBody, "description": "The body does not parse."},
        413: {"model": ErrorBody, "description": "Over the body or item limit."},
        415: {"model": ErrorBody, "description": "Not JSON or NDJSON."},
        422: {"model": InvalidBody, "description": "Some readings are invalid; each is listed."},
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
async def post_readings(request: Request, pipeline: PipelineDep, settings: SettingsDep) -> Any:
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type in JSON_TYPES:
        parse = parse_json
    elif media_type in NDJSON_TYPES:
        parse = parse_ndjson
    else:
        shown = media_type or "none"
        return _error(415, f"content type {shown!r}: use application/json or application/x-ndjson")
    try:
        body = await _read_body(request, settings.max_body_bytes)
        readings = parse(body, max_items=settings.max_readings_per_request)
    except TooLarge as exc:
        return _error(413, str(exc))
    except BodyError as exc:
        return _error(400, str(exc))
    except InvalidItems as exc:
        errors = [{"index": e.index, "field": e.field, "reason": e.reason} for e in exc.errors]
        return JSONResponse(
            {"detail": f"{len(errors)} invalid readings; nothing was accepted", "errors": errors},
            status_code=422,
        )
    if not readings:
        return _error(422, "the request holds no readings")
    try:
        accepted, duplicates = await pipeline.offer(readings)
    except Overloaded as exc:
        return _error(503, str(exc), {"Retry-After": str(exc.retry_after_s)})
    return JSONResponse({"accepted": accepted, "duplicates": duplicates}, status_code=202)
