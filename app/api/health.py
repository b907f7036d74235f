"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import HubDep, PipelineDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Ready for work: the pool and backend can take readings")
async def readyz(pipeline: PipelineDep, hub: HubDep) -> JSONResponse:
    backend = await hub.backend.ping()
    checks = {**(await pipeline.checks() if backend else {}), "backend": backend}
    ready = all(checks.values())
    return JSONResponse(
        {
            "status": "ready" if ready else "not ready",
            "checks": checks,
            "pool": pipeline.describe(),
        },
        status_code=200 if ready else 503,
    )
