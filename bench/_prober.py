"""A latency prober, run as its own process by ``bench/saturation.py``.

``python -m bench._prober URL --start T0 --end T1`` GETs ``URL`` every 10 ms on one keep-alive
connection and prints one ``RESULT {json}`` line with the p50, p99 and max latency (ms) of the
probes sent between the epoch times T0 and T1. A probe that fails or takes over 5 s counts as
5 s, so a stalled service cannot look healthy.
"""

from __future__ import annotations

import argparse
import json
import time

import httpx

from bench._common import percentile

INTERVAL_S = 0.01
TIMEOUT_S = 5.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--start", type=float, required=True)
    parser.add_argument("--end", type=float, required=True)
    args = parser.parse_args()
    if not args.url.startswith(("http://127.0.0.1:", "http://[::1]:")):
        raise SystemExit("the prober targets 127.0.0.1 or ::1 only")
    latencies: list[float] = []
    failed = 0
    with httpx.Client(timeout=TIMEOUT_S) as client:
        while (now := time.time()) < args.end:
            t0 = time.perf_counter()
            try:
                ok = client.get(args.url).status_code == 200
            except httpx.HTTPError:
                ok = False
            ms = (time.perf_counter() - t0) * 1e3 if ok else TIMEOUT_S * 1e3
            if now >= args.start:
                latencies.append(ms)
                failed += not ok
            rest = INTERVAL_S - (time.perf_counter() - t0)
            if rest > 0:
                time.sleep(rest)
    result = {
        "probes": len(latencies),
        "failed": failed,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies, default=float("nan")),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
