"""Hardening: the service under hostile-but-local load, with default settings.

Three runs against ``sensorcast serve`` on loopback, each bounded in time and count:

1. ``sensors``: 150,000 distinct sensor ids (30,000 with ``--quick``), one reading each, in
   requests of 1,000, while ``/healthz`` is probed every 20 ms. Reported: sensors accepted
   and refused (507, ``max_sensors``), the RSS growth of the service and its model processes,
   the memory per accepted sensor, and the probe's p99.
2. ``websockets``: 1,500 WebSockets (300 with ``--quick``) that never read, beside 500
   readings/s, while ``/healthz`` is probed from another process (``bench/ws_flood.py``).
   Reported: subscribers accepted and refused, readings accepted, the probe's p99, the
   event-loop lag and the stalled subscribers closed.
3. ``stalled bodies``: eight connections that send all but one byte of a body at
   ``max_body_bytes`` and stall, beside 50 small POSTs a second. Reported: the share of
   the small POSTs accepted.

Run: ``python -m bench.hardening [--quick] [--json PATH]``
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import psutil

from bench._common import HOST, Results, parse_args, percentile, probe_latency, service
from bench.ws_flood import flood, report

TARGET_RSS_MIB = 600
TARGET_HEALTHZ_P99_MS = 100
TARGET_ACCEPTED_SHARE = 0.8


def tree_rss(pid: int) -> int:
    """RSS of a process and all its descendants, in bytes."""
    proc = psutil.Process(pid)
    total: int = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


async def _probed(url: str, work: Any) -> tuple[Any, list[float]]:
    """Run ``work`` while probing ``/healthz`` every 20 ms; its result and the latencies."""
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=10) as client:
        probe = asyncio.create_task(
            probe_latency(client, url + "/healthz", interval_s=0.02, stop=stop)
        )
        try:
            result = await work
        finally:
            stop.set()
        return result, await probe


async def sensors_run(results: Results, count: int) -> None:
    with service() as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
            before = tree_rss(srv.pid)

            async def post_all() -> dict[str, int]:
                counts = {"accepted": 0, "refused": 0, "other": 0}
                for start in range(0, count, 1000):
                    body = [
                        {"sensor_id": f"bulk-{i}", "value": 1.0}
                        for i in range(start, min(count, start + 1000))
                    ]
                    r = await client.post("/v1/readings", json=body)
                    if r.status_code == 202:
                        counts["accepted"] += len(body)
                    elif r.status_code == 507:
                        counts["refused"] += len(body)
                    else:
                        counts["other"] += len(body)
                return counts

            counts, latencies = await _probed(srv.url, post_all())
            # Let every accepted reading be predicted and one checkpoint be taken.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                total = (await client.get("/v1/sensors", params={"limit": 1})).json()["total"]
                if total >= counts["accepted"]:
                    break
                await asyncio.sleep(0.2)
            await asyncio.sleep(6)
            grown = tree_rss(srv.pid) - before
    grown_mib = grown / 2**20
    results.row("sensors", "sensors posted", count, "")
    results.row("sensors", "sensors accepted", counts["accepted"], "")
    results.row("sensors", "sensors refused (507)", counts["refused"], "")
    results.row(
        "sensors", "RSS growth", grown_mib, "MiB",
        target=f"<= {TARGET_RSS_MIB}", met=grown_mib <= TARGET_RSS_MIB,
    )  # fmt: skip
    if counts["accepted"]:
        results.row("sensors", "memory per sensor", grown / counts["accepted"] / 1024, "KiB")
    p99 = percentile(latencies, 99)
    results.row(
        "sensors", "/healthz p99", p99, "ms",
        target=f"<= {TARGET_HEALTHZ_P99_MS}", met=p99 <= TARGET_HEALTHZ_P99_MS,
    )  # fmt: skip


async def websockets_run(results: Results, sockets: int, duration_s: float) -> None:
    with service() as srv:
        report(results, "websockets", sockets, await flood(srv, sockets, 500, duration_s))


async def stalled_bodies_run(results: Results, duration_s: float) -> None:
    size = 8 * 2**20  # the default max_body_bytes
    with service() as srv:
        stalled = []
        for _ in range(8):
            reader, writer = await asyncio.open_connection(HOST, srv.port)
            writer.write(
                f"POST /v1/readings HTTP/1.1\r\nHost: {HOST}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n".encode()
            )
            writer.write(b" " * (size - 1))
            stalled.append(writer)
        await asyncio.sleep(1.0)  # let the stalled bodies arrive
        counts = {"accepted": 0, "sent": 0}
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            started = time.monotonic()
            n = 0
            while (elapsed := time.monotonic() - started) < duration_s:
                due = n / 50
                if due > elapsed:
                    await asyncio.sleep(due - elapsed)
                body = json.dumps([{"sensor_id": f"legit-{n % 20}", "value": 1.0}])
                r = await client.post(
                    "/v1/readings", content=body, headers={"content-type": "application/json"}
                )
                counts["sent"] += 1
                counts["accepted"] += r.status_code == 202
                n += 1
        for writer in stalled:
            writer.transport.abort()
    share = counts["accepted"] / max(1, counts["sent"])
    results.row("stalled bodies", "legitimate POSTs sent", counts["sent"], "")
    results.row(
        "stalled bodies", "legitimate POSTs accepted", share * 100, "%",
        target=f">= {TARGET_ACCEPTED_SHARE * 100:.0f}", met=share >= TARGET_ACCEPTED_SHARE,
    )  # fmt: skip


async def main() -> None:
    args = parse_args(__doc__ or "")
    results = Results("hardening")
    await sensors_run(results, 30_000 if args.quick else 150_000)
    await websockets_run(results, 300 if args.quick else 1500, 8 if args.quick else 20)
    await stalled_bodies_run(results, 5 if args.quick else 15)
    results.write(args.json)


if __name__ == "__main__":
    asyncio.run(main())
