"""The event-loop lag monitor and its endpoint."""

from __future__ import annotations

import asyncio
import time

import httpx

from app.looplag import LoopLagMonitor
from tests.conftest import Server


async def test_a_blocked_loop_shows_as_one_large_sample() -> None:
    """Blocking the loop for 60 ms yields a max lag of about 60 ms and a small median."""
    async with LoopLagMonitor() as monitor:
        await asyncio.sleep(0.1)
        time.sleep(0.06)  # noqa: ASYNC251 - the stall being measured
        await asyncio.sleep(0.1)
        summary = monitor.summary()
    assert summary.samples > 20
    assert summary.max_ms >= 50
    assert summary.p50_ms < 20


async def test_window_only_counts_recent_samples() -> None:
    """A stall older than the window is left out of the window's summary."""
    async with LoopLagMonitor() as monitor:
        await asyncio.sleep(0.02)
        time.sleep(0.06)  # noqa: ASYNC251 - the stall being measured
        await asyncio.sleep(0.5)
        recent = monitor.summary(window_s=0.2)
        everything = monitor.summary()
    assert everything.max_ms >= 50
    assert recent.max_ms < 50
    assert 0 < recent.samples < everything.samples


async def test_stop_is_idempotent() -> None:
    """stop() twice, or before start(), does nothing."""
    monitor = LoopLagMonitor()
    await monitor.stop()
    monitor.start()
    await monitor.stop()
    await monitor.stop()


def test_endpoint_reports_lag_of_the_service(server: Server) -> None:
    """GET /v1/debug/loop-lag answers percentiles over a window with samples taken."""
    time.sleep(0.3)
    r = httpx.get(f"{server.url}/v1/debug/loop-lag", params={"window_s": 5}, timeout=10)
    assert r.status_code == 200
    body = r.json()
    assert body["interval_ms"] == 1.0
    assert body["samples"] > 50
    assert 0 <= body["p50_ms"] <= body["p99_ms"] <= body["max_ms"]
    bad = httpx.get(f"{server.url}/v1/debug/loop-lag", params={"window_s": -1}, timeout=10)
    assert bad.status_code == 422
