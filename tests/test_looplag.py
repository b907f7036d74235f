"""The event-loop lag monitor and its endpoint."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import httpx
import psutil
import pytest

from app import scheduling
from app.looplag import LoopLagMonitor
from tests.conftest import Server, slice_us_of


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


needs_thread_slices = pytest.mark.skipif(
    scheduling.thread_slice_us() is None, reason="this kernel keeps no time slice per thread"
)


@needs_thread_slices
def test_a_thread_asks_for_a_short_slice_and_its_new_threads_do_not_inherit_it() -> None:
    """The slice is the calling thread's alone: neither the process's other threads nor
    the threads it starts afterwards get it; 0 gives the kernel's default back."""
    seen: dict[str, int | None] = {}

    def ask() -> None:
        default = scheduling.thread_slice_us()
        seen["got"] = scheduling.request_thread_slice(100)
        seen["proc"] = slice_us_of(os.getpid(), threading.get_native_id())
        child = threading.Thread(target=lambda: seen.update(child=scheduling.thread_slice_us()))
        child.start()
        child.join()
        seen["reset"] = scheduling.request_thread_slice(0)
        seen["default"] = default

    other = threading.Thread(target=ask)
    other.start()
    other.join()
    assert seen["got"] == seen["proc"] == 100
    assert seen["default"] != 100 and seen["child"] == seen["default"]
    assert seen["reset"] == seen["default"]
    assert scheduling.thread_slice_us() == seen["default"]  # this thread was never touched
    with pytest.raises(ValueError, match="100 to 100,000"):
        scheduling.request_thread_slice(50)


@needs_thread_slices
def test_the_service_loop_runs_on_a_short_slice(server: Server) -> None:
    """The event loop's thread (the main thread) runs on ``loop_slice_us`` (100 µs by
    default); the service's other threads and the model processes keep the kernel's
    default."""
    pid = server.proc.pid
    default = scheduling.thread_slice_us()
    threads = {int(tid): slice_us_of(pid, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}
    assert threads.pop(pid) == 100
    assert threads and set(threads.values()) == {default}
    descendants = psutil.Process(pid).children(recursive=True)
    assert {slice_us_of(p.pid) for p in descendants} <= {default}
