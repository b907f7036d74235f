"""GET /metrics: Prometheus text exposition of the app's registry."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.health import readiness
from app.metrics import Metrics

router = APIRouter(tags=["operations"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
)
async def metrics(request: Request) -> Response:
    """The app's metrics in the Prometheus text format. The pipeline's counters are read
    at this moment (see ``app.metrics``), so a scrape costs a few hundred microseconds and
    nothing is paid per reading. Readiness (and, on Redis, the live workers) is checked as
    ``/readyz`` checks it, so that an alert needs no second probe."""
    registry: Metrics = request.app.state.metrics
    pipeline = getattr(request.state, "pipeline", None)
    hub = getattr(request.state, "hub", None)
    if pipeline is not None and hub is not None:
        checks = await readiness(pipeline, hub)
        registry.ready = all(checks.values())
        # RemoteIngest (an API replica on Redis) counts the workers as part of its checks.
        workers = getattr(pipeline, "workers_live", None)
        if isinstance(workers, int):
            registry.workers_live = workers if checks["backend"] else None
    return Response(generate_latest(registry.registry), media_type=CONTENT_TYPE_LATEST)
