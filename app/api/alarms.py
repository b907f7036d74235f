"""GET /v1/alarms and POST /v1/alarms/{alarm_id}/ack: alarm episodes and their acknowledgement."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query

from app.access import Scope
from app.api.auth import require
from app.api.deps import HubDep
from app.pipeline.alarm_book import acknowledged_body
from app.pipeline.hub import SensorFilter
from app.pipeline.wire import CHANNEL, encode_batch

router = APIRouter(tags=["alarms"])


@router.get(
    "/v1/alarms",
    summary="Alarm episodes: active ones and recently cleared ones",
    dependencies=[require(Scope.subscribe)],
)
async def list_alarms(
    hub: HubDep,
    state: Literal["active", "recent", "all"] = "all",
    sensor: Annotated[list[str], Query(description="sensor ids or globs")] = [],  # noqa: B006
) -> dict[str, Any]:
    """Active alarms (``state=active``), cleared ones kept for a while (``recent``), or both,
    newest first, optionally for the sensors named (ids or globs such as ``pump-*``)."""
    wants = SensorFilter(sensor).wants_sensor if sensor else None
    return {"alarms": hub.alarms.select(state, wants)}


@router.post(
    "/v1/alarms/{alarm_id}/ack",
    summary="Acknowledge an alarm",
    dependencies=[require(Scope.ack)],
    responses={404: {"description": "No such alarm (or it was cleared long ago)."}},
)
async def acknowledge(alarm_id: str, hub: HubDep) -> dict[str, Any]:
    """Mark an alarm acknowledged: every subscriber gets an ``alarm`` frame with ``state:
    "acknowledged"``, and the alarm stays so until it clears (a reopened episode must be
    acknowledged again). Acknowledging it twice changes nothing."""
    alarm = hub.alarms.get(alarm_id)
    if alarm is None:
        raise HTTPException(404, f"unknown alarm {alarm_id!r}")
    if not alarm.get("acknowledged"):
        body = acknowledged_body(alarm)
        sensor_id = str(alarm.get("sensor_id", ""))
        payload = encode_batch([("alarm", sensor_id, True, body)])
        seq = await hub.backend.publish(CHANNEL, payload, 1)
        await hub.settle(seq, timeout_s=5.0)
        alarm = hub.alarms.get(alarm_id) or alarm
    return alarm
