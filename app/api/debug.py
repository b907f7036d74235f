"""GET /v1/debug/loop-lag: how late the event loop runs, for benchmarks and diagnosis."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request

from app.looplag import LoopLagMonitor

router = APIRouter(tags=["debug"])


@router.get("/v1/debug/loop-lag", summary="Event-loop lag percentiles")
async def loop_lag(
    request: Request,
    window_s: Annotated[float | None, Query(gt=0, le=3600)] = None,
) -> dict[str, float]:
    """Overshoot of a 1 ms timer on the service's event loop over the last ``window_s``
    seconds (all kept samples when absent): near zero unless something blocks the loop."""
    monitor: LoopLagMonitor = request.app.state.loop_lag
    summary = monitor.summary(window_s)
    return {"interval_ms": monitor.interval_s * 1e3, **summary._asdict()}
