"""GET /: the live dashboard (static files, no build step), and GET /v1/stats for its figures.

The page itself holds no data and is served to anyone; what it shows comes from routes that
need the ``subscribe`` scope where API keys are set (it passes the key given as ``/?key=``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from app.access import Scope
from app.api.auth import require
from app.metrics import Metrics

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(tags=["dashboard"])


@router.get("/", summary="The live dashboard page", include_in_schema=False)
async def index() -> FileResponse:
    # no-cache: the page is tiny, and a stale copy after an upgrade would talk to a
    # server whose frames it does not know.
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get(
    "/v1/stats",
    summary="Live figures: counters, recent latency, subscribers",
    dependencies=[require(Scope.subscribe)],
)
async def stats(request: Request) -> dict[str, Any]:
    """Counters since start-up (``accepted``, ``refused``, ``published``...), the POST to
    broadcast latency of the last 10 s of batches, and the current subscribers and sensors.
    Poll it and divide the change in ``accepted`` by the change in ``time`` for a rate."""
    metrics: Metrics = request.app.state.metrics
    return metrics.stats()
