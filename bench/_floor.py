"""The machine's own loop-lag floor, run as its own process by ``bench/saturation.py``.

``python -m bench._floor --start T0 --end T1`` runs a bare uvloop event loop that does nothing
but the service's lag measurement (:class:`app.looplag.LoopLagMonitor`, a 1 ms sleep) and
prints one ``RESULT {json}`` line with the p50, p99 and max lag (ms) of the epoch window
T0..T1. Beside the same load generators, model processes and prober as the service, it shows
how late the operating system alone wakes a loop that never works: the part of the service's
lag no code in the service can remove, on a machine whose cores the load shares.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import uvloop

from app.looplag import LoopLagMonitor


async def measure(start: float, end: float) -> dict[str, float]:
    monitor = LoopLagMonitor()
    async with monitor:
        await asyncio.sleep(max(0.0, start - time.time()))
        monitor.reset()
        await asyncio.sleep(max(0.0, end - time.time()))
        summary = monitor.summary()
    return {"samples": summary.samples, "p50_ms": summary.p50_ms, "p99_ms": summary.p99_ms,
            "max_ms": summary.max_ms}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--start", type=float, required=True)
    parser.add_argument("--end", type=float, required=True)
    args = parser.parse_args()
    result = uvloop.run(measure(args.start, args.end))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
