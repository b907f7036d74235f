"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import HubDep, Ingest, PipelineDep
from app.pipeline.hub import PredictionHub

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def readiness(pipeline: Ingest, hub: PredictionHub) -> dict[str, bool]:
    """The checks behind ``/readyz`` (and the ``sensorcast_ready`` gauge): ready when all hold."""
    backend = await hub.backend.ping()
    checks = await pipeline.checks() if backend else {}
    return {**checks, "backend": backend, "stream": hub.listening}


@router.get("/readyz", summary="Ready for work: the pool and backend can take readings")
async def readyz(pipeline: PipelineDep, hub: HubDep) -> JSONResponse:
    checks = await readiness(pipeline, hub)
    ready = all(checks.values())
    return JSONResponse(
        {
            "status": "ready" if ready else "not ready",
            "checks": checks,
            "pool": pipeline.describe(),
        },
        status_code=200 if ready else 503,
    )
