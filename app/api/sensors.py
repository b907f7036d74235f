"""GET /v1/sensors: what the service knows about each sensor, a page at a time."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query

from app.api.deps import HubDep
from app.pipeline.hub import SENSOR_PAGE_MAX
from app.schemas import SENSOR_ID_PATTERN

router = APIRouter(tags=["sensors"])


@router.get(
    "/v1/sensors",
    summary="Known sensors, their counts and last predictions, a page at a time",
    description=(
        "Sensors ordered by id, at most `limit` per page. `next` is the cursor of the next "
        "page (pass it as `cursor`), null on the last one; a sensor known throughout a walk "
        "of the pages appears on exactly one."
    ),
)
async def list_sensors(
    hub: HubDep,
    limit: Annotated[int, Query(ge=1, le=SENSOR_PAGE_MAX)] = SENSOR_PAGE_MAX,
    cursor: Annotated[str | None, Query(max_length=128, pattern=SENSOR_ID_PATTERN)] = None,
) -> dict[str, Any]:
    sensors, next_cursor = hub.sensor_page(limit, cursor)
    return {
        "count": len(sensors),
        "total": len(hub.sensors),
        "sensors": sensors,
        "next": next_cursor,
    }


@router.get("/v1/sensors/{sensor_id}", summary="One sensor, with its recent predictions")
async def get_sensor(sensor_id: str, hub: HubDep) -> dict[str, Any]:
    found = hub.sensor(sensor_id)
    if found is None:
        raise HTTPException(404, f"unknown sensor {sensor_id!r}")
    return found
