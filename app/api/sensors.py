"""GET /v1/sensors: what the service knows about each sensor."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException

from app.api.deps import HubDep

router = APIRouter(tags=["sensors"])


@router.get("/v1/sensors", summary="Known sensors, their counts and last predictions")
async def list_sensors(hub: HubDep) -> dict[str, Any]:
    sensors = hub.sensor_list()
    return {"count": len(sensors), "sensors": sensors}


@router.get("/v1/sensors/{sensor_id}", summary="One sensor, with its recent predictions")
async def get_sensor(sensor_id: str, hub: HubDep) -> dict[str, Any]:
    found = hub.sensor(sensor_id)
    if found is None:
        raise HTTPException(404, f"unknown sensor {sensor_id!r}")
    return found
