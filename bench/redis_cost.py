"""What a reading costs Redis on the scale-out path, and what that projects to.

One API replica, one ``sensorcast worker`` (one model process per core) and a throwaway
redis-server (AOF, fsync every second) take a known number of readings, posted as
1,000-reading requests and then one reading a request, while a ``batch=true`` subscriber
waits for every prediction. Redis's own counters (``INFO stats``, ``INFO cpu``,
``INFO commandstats``) are read before and after each phase, less what the same topology
costs Redis idle for as long (measured first), so the figures include
everything the topology does for those readings: the ingest script, the worker's stream
reads, its publish-and-acknowledge script and checkpoints, lease renewals, and the API
replica reading the prediction stream.

Figures per reading: Redis CPU (user + system), commands Redis executed (script-internal
commands counted too, as Redis counts them), bytes into and out of Redis. From them, marked
as projections: the readings/s one Redis primary carries on one core, and the model
processes a target rate needs at the per-process rate measured here.

Run: ``python -m bench.redis_cost [--quick] [--json PATH]``
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from contextlib import ExitStack
from typing import Any

import httpx
import redis
import websockets

from bench._common import Results, parse_args, service
from bench.scaleout import redis_server, worker

TARGETS = (100_000, 1_000_000)
IDLE_S = 3.0


def counters(client: redis.Redis) -> dict[str, float]:
    """Redis's cumulative CPU seconds, network bytes and command calls."""
    info: dict[str, Any] = client.info("all")
    calls = sum(v["calls"] for k, v in info.items() if k.startswith("cmdstat_"))
    xread = info.get("cmdstat_xread", {})
    return {
        "cpu_s": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
        "in_bytes": float(info["total_net_input_bytes"]),
        "out_bytes": float(info["total_net_output_bytes"]),
        "calls": float(calls),
        "xread_usec": float(xread.get("usec", 0)),
    }


def _body(first: int, count: int, sensors: int, t0: float) -> list[dict[str, Any]]:
    # Readings in order with rising ts, each with an id, as a gateway sends them.
    return [
        {
            "sensor_id": f"rc-{i % sensors:04d}",
            "ts": t0 + (i // sensors),
            "value": round(20 + math.sin(i / 17), 3),
            "id": str(i),
        }
        for i in range(first, first + count)
    ]


async def _phase(
    url: str, ws_url: str, first: int, total: int, per_request: int, sensors: int, t0: float
) -> float:
    """Post ``total`` readings ``per_request`` at a time; wait for every prediction; the
    seconds it took."""
    started = time.perf_counter()
    async with (
        websockets.connect(ws_url + "?batch=true", max_size=None) as ws,
        httpx.AsyncClient(base_url=url, timeout=30) as client,
    ):
        hello = json.loads(await ws.recv())
        assert hello["type"] == "hello", hello

        async def post_all() -> None:
            for start in range(first, first + total, per_request):
                body = _body(start, per_request, sensors, t0)
                while True:
                    r = await client.post("/v1/readings", json=body if per_request > 1 else body[0])
                    if r.status_code == 202:
                        break
                    assert r.status_code == 503, r.text
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))

        posting = asyncio.create_task(post_all())
        seen = 0
        async with asyncio.timeout(300):
            while seen < total:
                message = json.loads(await ws.recv())
                items = message["items"] if message["type"] == "predictions" else [message]
                seen += sum(1 for m in items if m["type"] == "prediction")
        await posting
    return time.perf_counter() - started


def main() -> None:
    args = parse_args(__doc__ or "")
    bulk_total, single_total = (20_000, 1_000) if args.quick else (100_000, 4_000)
    sensors = 200
    cores = os.cpu_count() or 1
    results = Results("redis_cost")
    phases: dict[str, dict[str, float]] = {}
    with redis_server() as url, ExitStack() as stack:
        stack.enter_context(worker(url, cores))
        svc = stack.enter_context(service(backend=url, log_level="warning"))
        client = redis.Redis.from_url(url)
        t0 = time.time() - 86_400.0
        # Warm-up: every sensor past its first fit, so the phases measure the steady path.
        asyncio.run(_phase(svc.url, svc.ws_url, 0, sensors * 120, 1000, sensors, t0))
        first = sensors * 120
        # What the topology costs Redis doing nothing (lease renewals, heartbeats, blocking
        # reads timing out, Redis's own cron), per second: taken out of each phase.
        before = counters(client)
        time.sleep(IDLE_S)
        after = counters(client)
        idle = {k: (after[k] - before[k]) / IDLE_S for k in after}
        for name, total, per_request in (
            ("1,000-reading requests", bulk_total, 1000),
            ("single-reading requests", single_total, 1),
        ):
            before = counters(client)
            seconds = asyncio.run(
                _phase(svc.url, svc.ws_url, first, total, per_request, sensors, t0)
            )
            after = counters(client)
            first += total
            phases[name] = {
                k: max(0.0, after[k] - before[k] - idle[k] * seconds) / total for k in after
            }
            phases[name]["rate"] = total / seconds
        client.close()
    for name, p in phases.items():
        item = f"redis {name}"
        results.row(item, "Redis CPU per reading", p["cpu_s"] * 1e6, "us/reading")
        results.row(item, "Redis commands per reading", p["calls"], "commands")
        results.row(item, "bytes into Redis per reading", p["in_bytes"], "bytes")
        results.row(item, "bytes out of Redis per reading", p["out_bytes"], "bytes")
        results.row(
            item, "of which one API replica reading the stream (XREAD)", p["xread_usec"],
            "us/reading",
        )  # fmt: skip
        results.row(item, "readings/s through the topology here", p["rate"], "readings/s")
    bulk = phases["1,000-reading requests"]
    primary = 1.0 / bulk["cpu_s"] if bulk["cpu_s"] else math.nan
    results.row(
        "projected", "readings/s one Redis primary carries (1 core, bulk requests)", primary,
        "readings/s",
    )  # fmt: skip
    from bench.scaling import run_runners

    per_process = asyncio.run(run_runners(1, 300 if args.quick else 700))
    results.row("projected", "model stage, readings/s per model process", per_process, "readings/s")
    for target in TARGETS:
        results.row(
            "projected", f"model processes for {target:,} readings/s", target / per_process,
            "processes",
        )  # fmt: skip
        results.row(
            "projected", f"Redis primaries for {target:,} readings/s (partitioned)",
            target / primary, "primaries",
        )  # fmt: skip
    results.row("redis idle", "Redis CPU while idle, one API and one worker", idle["cpu_s"] * 1e3,
                "ms/s")  # fmt: skip
    results.note(
        f"{sensors} sensors; warm-up {sensors * 120:,} readings; phases {bulk_total:,} readings "
        f"in 1,000-reading requests and {single_total:,} single-reading requests; one API "
        f"replica, one worker with {cores} model processes; projections divide a target by "
        "the figures measured here"
    )
    results.write(args.json)


if __name__ == "__main__":
    main()
