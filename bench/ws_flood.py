"""WebSocket flood: many subscribers that never read, beside a steady stream of readings.

``sensorcast serve`` runs with its default settings in its own process. This process opens
``--sockets`` unfiltered subscriptions that complete their handshake and never read again
(a 4 KiB receive buffer each, and nothing read into this process), then, over a window of
``--duration`` seconds:

- POSTs 10-reading bodies open-loop at ``--rate`` readings/s (sent on schedule whatever the
  answers, at most 64 in flight): readings accepted (202) per second;
- a prober in another process (``bench/_prober.py``) GETs ``/healthz`` every 10 ms: p50/p99;
- one subscriber that reads (``bench/_subscriber.py`` through ``bench.e2e.subscribe``) counts
  the predictions it receives: a slow client must not slow the others;
- at the end, ``GET /v1/debug/loop-lag`` gives the event-loop lag p99 over the window and
  ``/metrics`` how many stalled subscribers the service closed.

``--root DIR`` serves the code of another checkout (with this interpreter), so that two
versions can be measured side by side in one run.

Run: ``python -m bench.ws_flood [--quick] [--json PATH] [--sockets N] [--rate R]
[--duration S] [--root DIR ...]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench._common import (
    HOST,
    ROOT,
    Results,
    Server,
    _running,
    free_port,
    paced_posts,
    websocket_handshake,
)

TARGET_HEALTHZ_P99_MS = 100
BODY_READINGS = 10


@contextmanager
def service_at(root: Path, **settings: str) -> Iterator[Server]:
    """``sensorcast serve`` with the code of ``root`` on a free loopback port, ready."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "SENSORCAST_HOST": HOST,
        "SENSORCAST_PORT": str(port),
        "SENSORCAST_LOG_LEVEL": "warning",
        **{f"SENSORCAST_{k.upper()}": v for k, v in settings.items()},
    }
    cmd = [sys.executable, "-m", "app", "serve"]
    with _running(cmd, env, port, "/readyz", cwd=root) as server:
        yield server


async def silent_ws(port: int) -> tuple[asyncio.StreamWriter, int]:
    """A WebSocket that completes its handshake and never reads again; its HTTP status."""
    _, writer, head = await websocket_handshake(port, rcvbuf=4096, timeout_s=30)
    # The stream would otherwise read up to its 64 KiB limit into this process.
    transport = writer.transport
    assert isinstance(transport, asyncio.ReadTransport)
    transport.pause_reading()
    return writer, int(head.split(b" ", 2)[1])


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    return float(m[1]) if m else float("nan")


async def flood(svc: Server, sockets: int, rate: float, duration_s: float) -> dict[str, Any]:
    """Open the silent sockets, then post and probe for ``duration_s``; the figures."""
    from bench.e2e import result_of, subscribe
    from bench.saturation import _result, _spawn

    statuses: dict[int, int] = {}
    writers = []
    for _ in range(sockets):
        writer, status = await silent_ws(svc.port)
        statuses[status] = statuses.get(status, 0) + 1
        writers.append(writer)
    start = time.time() + 1.0
    print(f"window from {start:.1f} (epoch s)", flush=True)
    end = start + duration_s
    window = ("--start", str(start), "--end", str(end))
    prober = _spawn("bench._prober", svc.url + "/healthz", *window)
    reader = subscribe(svc.ws_url + "?batch=true", start, end, latency=False)

    def body(n: int) -> bytes:
        items = ",".join(
            f'{{"sensor_id":"ws-{i}","value":{n % 17}.0,"id":"{n}.{i}"}}'
            for i in range(BODY_READINGS)
        )
        return f"[{items}]".encode()

    lag_series: list[tuple[float, float, float]] = []

    async def watch_lag(client: httpx.AsyncClient) -> None:
        # The worst loop lag of each half second and the subscribers left: when it stalls.
        while True:
            await asyncio.sleep(0.5)
            lag = await client.get(svc.url + "/v1/debug/loop-lag", params={"window_s": 0.5})
            subs = _metric((await client.get(svc.url + "/metrics")).text, "sensorcast_subscribers")
            lag_series.append((round(time.time() - start, 1), lag.json()["max_ms"], subs))

    try:
        await asyncio.sleep(max(0.0, start - time.time()))
        async with httpx.AsyncClient(timeout=30) as client:
            watcher = asyncio.create_task(watch_lag(client))
            counts = await paced_posts(
                client, svc.url + "/v1/readings", requests_per_s=rate / BODY_READINGS,
                duration_s=duration_s, body=body,
            )  # fmt: skip
            lag = (
                await client.get(svc.url + "/v1/debug/loop-lag", params={"window_s": duration_s})
            ).json()
            metrics = (await client.get(svc.url + "/metrics")).text
            watcher.cancel()
        probe = _result(prober, 60)
        delivered = result_of(reader)
    finally:
        for writer in writers:
            writer.transport.abort()
        for p in (prober, reader):
            if p.poll() is None:
                p.kill()
                p.wait(10)
    return {
        "accepted": statuses.get(101, 0),
        "refused": statuses.get(503, 0),
        "readings_per_s": counts["ok"] * BODY_READINGS / duration_s,
        "posts_failed": counts["non_2xx"] + counts["errors"],
        "delivered_per_s": delivered["rate"],
        "healthz_p50_ms": probe["p50_ms"],
        "healthz_p99_ms": probe["p99_ms"],
        "loop_lag_p99_ms": lag["p99_ms"],
        "stalled_closed": _metric(metrics, "sensorcast_stalled_disconnects_total"),
        "open_at_end": _metric(metrics, "sensorcast_websocket_connections"),
        "lag_series": lag_series,
    }


def report(results: Results, item: str, sockets: int, r: dict[str, Any]) -> None:
    results.row(item, "never-reading sockets opened", sockets, "")
    results.row(item, "subscribers accepted (101)", r["accepted"], "")
    results.row(item, "handshakes refused (503)", r["refused"], "")
    results.row(item, "readings accepted per s", r["readings_per_s"], "/s")
    results.row(item, "POSTs refused or failed", r["posts_failed"], "")
    results.row(item, "predictions/s to a reading subscriber", r["delivered_per_s"], "/s")
    results.row(item, "/healthz p50 from another process", r["healthz_p50_ms"], "ms")
    p99 = r["healthz_p99_ms"]
    results.row(
        item, "/healthz p99 from another process", p99, "ms",
        target=f"<= {TARGET_HEALTHZ_P99_MS}", met=p99 <= TARGET_HEALTHZ_P99_MS,
    )  # fmt: skip
    results.row(item, "event-loop lag p99", r["loop_lag_p99_ms"], "ms")
    results.row(item, "stalled subscribers closed", r["stalled_closed"], "")
    results.row(item, "subscribers still open at the end", r["open_at_end"], "")
    series = r["lag_series"]
    results.series[f"{item}: loop lag"] = {
        "x": [t for t, _, _ in series], "y": [lag for _, lag, _ in series],
        "xlabel": "s into the window", "ylabel": "worst event-loop lag per 0.5 s, ms",
    }  # fmt: skip
    print("  t s / worst lag ms / subscribers: " + ", ".join(
        f"{t:g}/{lag:.0f}/{subs:.0f}" for t, lag, subs in series
    ))  # fmt: skip


async def run(results: Results, item: str, root: Path, sockets: int, rate: float, duration_s: float
) -> None:  # fmt: skip
    with service_at(root) as svc:
        report(results, item, sockets, await flood(svc, sockets, rate, duration_s))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--sockets", type=int)
    parser.add_argument("--rate", type=float, default=500.0, help="readings per second")
    parser.add_argument("--duration", type=float)
    parser.add_argument("--root", type=Path, action="append", help="checkouts to serve")
    args = parser.parse_args()
    sockets = args.sockets or (300 if args.quick else 1500)
    duration_s = args.duration or (8.0 if args.quick else 20.0)
    results = Results("ws_flood")
    roots = args.root or [ROOT]
    for root in roots:
        item = "ws flood" if len(roots) == 1 else f"ws flood {root.name}"
        asyncio.run(run(results, item, root.resolve(), sockets, args.rate, duration_s))
    results.write(args.json)


if __name__ == "__main__":
    main()
