"""Scaling: the model stage's throughput with 1 to ``cores`` shard workers.

Drives the service's own ``ShardPool`` (the worker processes, their IPC, the trainer pool and
model swaps) without HTTP or WebSockets: each shard is kept busy with ``batches_in_flight``
batches of 1,000 readings of its own sensors, refits go to the trainer and come back with the
next batch, as in the service. Readings/s per pool size, and their ratio to ideal linear
scaling from one worker.

Run: ``python -m bench.scaling [--quick] [--json PATH]``
"""

from __future__ import annotations

import asyncio
import os
import time
import zlib
from typing import Any

from app.config import Settings
from app.pipeline.inference import ShardPool
from app.schemas import Reading
from bench._common import Results, parse_args

BATCH = 1000
SENSORS_PER_SHARD = 50
IN_FLIGHT = 2


def _batches(shard: int, shards: int, count: int) -> list[list[Reading]]:
    sensors: list[str] = []
    n = 0
    while len(sensors) < SENSORS_PER_SHARD:
        sid = f"scale-{n}"
        if zlib.crc32(sid.encode()) % shards == shard:
            sensors.append(sid)
        n += 1
    out = []
    for b in range(count):
        base = 1_718_000_000.0 + b * 10
        out.append(
            [
                Reading(
                    sensors[i % len(sensors)],
                    None,
                    base + i * 0.01,
                    ("value",),
                    (20.0 + (i * 7 % 13) / 10,),
                    base,
                )  # fmt: skip
                for i in range(BATCH)
            ]
        )
    return out


async def run_pool(shards: int, model: str, duration_s: float) -> float:
    pool = ShardPool(shards, 1, model, 60.0)
    await pool.start()
    try:
        batches = [_batches(s, shards, 8) for s in range(shards)]
        installs: list[list[tuple[str, Any]]] = [[] for _ in range(shards)]
        fits: set[asyncio.Task[None]] = set()
        done = [0] * shards

        async def refit(shard: int, sensor_id: str, job: Any) -> None:
            installs[shard].append((sensor_id, await pool.fit(job)))

        async def drive(shard: int, until: float) -> None:
            in_flight: list[asyncio.Future[Any]] = []
            n = 0
            while time.perf_counter() < until or in_flight:
                while len(in_flight) < IN_FLIGHT and time.perf_counter() < until:
                    give, installs[shard] = installs[shard], []
                    in_flight.append(pool.run_batch(shard, batches[shard][n % 8], give))
                    n += 1
                result = await in_flight.pop(0)
                done[shard] += len(result.predictions)
                for job in result.jobs:
                    task = asyncio.create_task(refit(shard, job.sensor_id, job.job))
                    fits.add(task)
                    task.add_done_callback(fits.discard)

        # Warm up: every sensor past its first fit.
        await asyncio.gather(*(drive(s, time.perf_counter() + 1.0) for s in range(shards)))
        done = [0] * shards
        started = time.perf_counter()
        await asyncio.gather(*(drive(s, started + duration_s) for s in range(shards)))
        elapsed = time.perf_counter() - started
        for task in fits:
            task.cancel()
        return sum(done) / elapsed
    finally:
        await pool.stop()


def main() -> None:
    args = parse_args(__doc__ or "")
    duration_s = 2.0 if args.quick else 5.0
    cores = os.cpu_count() or 1
    model = Settings().model
    results = Results("scaling")
    sizes = list(range(1, cores + 1))
    rates = []
    for size in sizes:
        rate = asyncio.run(run_pool(size, model, duration_s))
        rates.append(rate)
        print(f"{size} workers: {rate:,.0f} readings/s", flush=True)
    for size, rate in zip(sizes, rates, strict=True):
        results.row(
            "scaling", f"model stage, {size} worker{'s' if size > 1 else ''}", rate,
            "readings/s", baseline="linear from 1 worker", baseline_value=rates[0] * size,
        )  # fmt: skip
    results.series["scaling"] = {
        "kind": "line",
        "x": sizes,
        "y": rates,
        "ideal": [rates[0] * s for s in sizes],
        "xlabel": "shard worker processes",
        "ylabel": "readings/s",
        "title": f"Model stage scaling ({model})",
    }
    results.write(args.json)


if __name__ == "__main__":
    main()
