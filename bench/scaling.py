"""Scaling: the model stage's throughput with 1 to ``cores`` model processes.

Drives the service's own :class:`~app.pipeline.runner.ShardRunner` (one model process each,
made as the service makes them: ``Settings().process_spec()``, at ``model_nice``, with the
service's checkpoint cadence) without HTTP or WebSockets. Each runner is kept busy with
``batches_in_flight`` batches of 1,000 readings of its own 100 sensors, each sensor's
readings in order with ``ts`` rising 1 s apart (``bench/_workload.py``), so the models refit
inline at the service's cadence. Timing starts once every sensor has had its first fit; the
batches are made before it. Readings/s per process count, against linear scaling from one.

Run: ``python -m bench.scaling [--quick] [--json PATH]``
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable

from app.config import Settings
from app.pipeline import wire
from app.pipeline.runner import Done, ShardRunner
from bench._common import Results, parse_args
from bench._workload import Stream, first_fit_readings, sensor_ids

BATCH = 1_000
SENSORS_PER_SHARD = 100


async def _drive(runner: ShardRunner, batches: list[wire.Packed], in_flight: int) -> int:
    """Submit ``batches`` in order, ``in_flight`` at a time; the readings predicted."""
    pending: deque[asyncio.Future[Done]] = deque()
    predicted = 0
    for batch in batches:
        if len(pending) >= in_flight:
            predicted += (await pending.popleft()).outcome.predictions
        pending.append(runner.submit(batch))
    while pending:
        predicted += (await pending.popleft()).outcome.predictions
    return predicted


Work = Callable[[int, int], list[list[wire.Packed]]]
"""``work(shards, until)``: the next batches of each shard, packed, until every sensor has
had ``until`` readings."""


def shard_streams(
    shards: int, sensors_per_shard: int = SENSORS_PER_SHARD, batch: int = BATCH
) -> Work:
    """This bench's work: each shard its own ``sensors_per_shard`` sensors, round robin, in
    batches of ``batch`` readings, packed before timing as the service packs at admission."""
    streams = [Stream(sensor_ids(sensors_per_shard, shard=i, shards=shards)) for i in range(shards)]

    def work(_: int, until: int) -> list[list[wire.Packed]]:
        return [[wire.pack(b) for b in s.until(until, batch)] for s in streams]

    return work


async def run_runners(
    shards: int, per_sensor: int, settings: Settings | None = None, *, work: Work | None = None
) -> float:
    """Readings/s of ``shards`` model processes on ``work`` (:func:`shard_streams` unless
    given), timed after every sensor's first fit.

    The more sensors share a batch, the fewer readings each has in it, and the more of the
    per-sensor work of a batch each reading carries: a baseline runs the sensors and batches
    of the load it is set against."""
    settings = settings or Settings()
    work = work or shard_streams(shards)
    spec = settings.process_spec()
    runners = [
        ShardRunner(
            i,
            spec,
            checkpoint_every_readings=settings.checkpoint_max_readings,
            checkpoint_interval_s=settings.checkpoint_interval_s,
        )
        for i in range(shards)
    ]
    await asyncio.gather(*(r.start() for r in runners))
    try:
        warm = first_fit_readings(settings.model_options()) + 16
        in_flight = settings.batches_in_flight
        warm_work = work(shards, warm)
        await asyncio.gather(
            *(_drive(r, w, in_flight) for r, w in zip(runners, warm_work, strict=True))
        )
        timed = work(shards, per_sensor)
        started = time.perf_counter()
        predicted = await asyncio.gather(
            *(_drive(r, w, in_flight) for r, w in zip(runners, timed, strict=True))
        )
        elapsed = time.perf_counter() - started
        expected = sum(b.size for w in timed for b in w)
        if sum(predicted) != expected:
            raise RuntimeError(f"{sum(predicted)} readings predicted of {expected}")
        return expected / elapsed
    finally:
        await asyncio.gather(*(r.stop() for r in runners))


def main() -> None:
    args = parse_args(__doc__ or "")
    per_sensor = 300 if args.quick else 700
    cores = os.cpu_count() or 1
    settings = Settings()
    results = Results("scaling")
    results.note(
        f"{settings.model}, {SENSORS_PER_SHARD} sensors per process, readings "
        f"{first_fit_readings(settings.model_options()) + 16} to {per_sensor} of each sensor"
    )
    sizes = list(range(1, cores + 1))
    rates = []
    for size in sizes:
        rate = asyncio.run(run_runners(size, per_sensor, settings))
        rates.append(rate)
        print(f"{size} model processes: {rate:,.0f} readings/s", flush=True)
    for size, rate in zip(sizes, rates, strict=True):
        results.row(
            "scaling", f"model stage, {size} process{'es' if size > 1 else ''}", rate,
            "readings/s", baseline="1 process", baseline_value=rates[0],
            target=">= 1.7x from 1 process" if size == 2 else None,
            met=rate / rates[0] >= 1.7 if size == 2 else None,
        )  # fmt: skip
    results.series["scaling"] = {
        "kind": "line",
        "x": sizes,
        "y": rates,
        "ideal": [rates[0] * s for s in sizes],
        "xlabel": "model processes",
        "ylabel": "readings/s",
        "title": f"Model stage scaling ({settings.model})",
    }
    results.write(args.json)


if __name__ == "__main__":
    main()
