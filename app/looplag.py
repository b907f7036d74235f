"""Event-loop lag: how late the service's event loop wakes a task that sleeps 1 ms.

The service rests on the loop never blocking (model work runs in other processes); this is
the measurement that shows it. A task sleeps ``interval_s`` over and over and records by how
much each wake-up overshot, with its time, in a bounded ring, so a stall of the loop shows up
as one large sample and a summary can cover a recent window only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import NamedTuple

from app.metrics import percentile


class LagSummary(NamedTuple):
    """Lag percentiles over a window, in milliseconds."""

    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float


def corrected(lags: list[float], interval_s: float, limit: int = 1_000_000) -> list[float]:
    """The samples plus those a stall kept the sleeper from taking, sorted.

    Examples:
        >>> corrected([0.0, 0.0035], 0.001)
        [0.0, 0.0005, 0.0015, 0.0025, 0.0035]
    """
    out = list(lags)
    for lag in lags:
        missed = int(lag / interval_s)
        if missed and len(out) < limit:
            out.extend(lag - k * interval_s for k in range(1, min(missed, limit - len(out)) + 1))
    out.sort()
    return out


class LoopLagMonitor:
    """A task that measures the running loop's timer overshoot.

    It costs one timer and one task step per ``interval_s`` (about 1% of a core at 1 ms).
    ``start`` and ``stop`` are idempotent; the monitor is also an async context manager.

    Args:
        interval_s: how long each sleep asks for.
        max_samples: size of the ring; older samples are forgotten.
    """

    def __init__(self, interval_s: float = 0.001, max_samples: int = 20_000) -> None:
        self.interval_s = interval_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def reset(self) -> None:
        """Forget the samples taken so far. The service calls it once ready: start-up (the
        pool's warm-up, imports, loading models) stalls the loop by design, and left in the
        window it would read as lag for a minute after every start."""
        self._samples.clear()

    async def __aenter__(self) -> LoopLagMonitor:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _run(self) -> None:
        interval = self.interval_s
        record = self._samples.append
        clock = time.monotonic
        while True:
            before = clock()
            await asyncio.sleep(interval)
            after = clock()
            record((after, max(0.0, after - before - interval)))

    def summary(self, window_s: float | None = None) -> LagSummary:
        """Percentiles of the samples of the last ``window_s`` seconds (all kept if None).

        Corrected for coordinated omission: a stall of ``L`` seconds also counts the samples
        the sleeper would have taken meanwhile (lags ``L - interval``, ``L - 2 interval``, ...),
        as HdrHistogram's expected-interval recording does. Without it a loop blocked for
        8 s yields a single sample and its p99 looks healthy. A stall still going on is not
        counted until the loop wakes up again.
        """
        if window_s is None:
            observed = [lag for _, lag in self._samples]
        else:
            horizon = time.monotonic() - window_s
            observed = [lag for at, lag in self._samples if at >= horizon]
        lags = corrected(observed, self.interval_s)
        return LagSummary(
            len(lags),
            percentile(lags, 50) * 1e3,
            percentile(lags, 99) * 1e3,
            (lags[-1] if lags else 0.0) * 1e3,
        )
