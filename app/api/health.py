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
    checks = {
        "pool": pipeline.pool.ready,
        "accepting": pipeline.ingestor.open,
        "backend": await hub.backend.ping(),
    }
    ready = all(checks.values())
    pool = pipeline.pool
    return JSONResponse(
        {
            "status": "ready" if ready else "not ready",
            "checks": checks,
            "pool": {
                "shard_pids": pool.pids,
                "shards_healthy": pool.healthy,
                "trainer_pids": pool.trainer_pids,
                "rebuilds": pool.rebuilds,
            },
        },
        status_code=200 if ready else 503,
    )
