"""The service process's cost per reading, step by step, in one process and on one core.

Everything but the model runs in the service process, on one event loop and under one GIL,
so the sum of these steps bounds the end-to-end throughput whatever the number of workers:
parse a 1,000-reading body, admit it, pickle the batch for a worker, unpickle the worker's
result, publish (frames and the backend envelope), dispatch in the hub, and join a
``batch=true`` frame. Each step is timed alone on the same data, median of repeats.

Run: ``python -m bench.hotpath [--quick] [--json PATH]``
"""

from __future__ import annotations

import asyncio
import pickle
import statistics
import time
from collections.abc import Callable
from typing import Any

from app.backends.memory import MemoryBackend
from app.config import Settings, SlowClientPolicy
from app.pipeline import inference
from app.pipeline.hub import PredictionHub, SensorFilter
from app.pipeline.ingest import Ingestor, RecentIds, ShardQueue
from app.pipeline.publish import Publisher, decode_batch
from app.schemas import parse_json
from bench._common import Results, parse_args, readings_body

N = 1000


def timed(fn: Callable[[], Any], seconds: float) -> float:
    """Median seconds per call over repeats filling about ``seconds``."""
    fn()
    samples = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(samples) < 5:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    args = parse_args(__doc__ or "")
    budget = 0.4 if args.quick else 1.5
    results = Results("hotpath")
    body = readings_body(N, 100)
    readings = parse_json(body, max_items=10_000)
    inference.init_worker(Settings().model)
    for _ in range(40):  # past warm-up, so the timed results are "ok" predictions
        result = inference.run_batch(readings, [])
        for job in result.jobs:
            fitted = inference.fit_job(Settings().model, job.job)
            inference.run_batch([], [(job.sensor_id, fitted)])
    result = inference.run_batch(readings, [])
    result_bytes = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)

    steps: dict[str, float] = {}
    steps["parse + validate (msgspec)"] = timed(lambda: parse_json(body, max_items=10_000), budget)

    def admit() -> None:
        queues = [ShardQueue(10**9) for _ in range(2)]
        Ingestor(queues, RecentIds(600, 10**6)).offer(readings)

    async def run_async_steps() -> None:
        steps["admit (dedup, shard, queue)"] = timed(admit, budget)
        steps["pickle batch to worker"] = timed(
            lambda: pickle.dumps((inference.run_batch, (readings, []), {}), protocol=5), budget
        )
        steps["unpickle worker result"] = timed(lambda: pickle.loads(result_bytes), budget)
        backend = MemoryBackend()
        publisher = Publisher(backend)
        captured: list[bytes] = []

        async def capture(channel: str, payload: bytes, count: int) -> int:
            captured.append(payload)
            return 1

        backend.publish = capture  # type: ignore[method-assign]

        def publish() -> None:
            captured.clear()
            coro = publisher.publish(result.predictions, result.swaps)
            try:
                coro.send(None)
            except StopIteration:
                pass

        steps["publish (envelope)"] = timed(publish, budget)
        payload = captured[-1]
        hub = PredictionHub(
            backend, history_max_frames=100_000, history_max_age_s=3600,
            subscriber_queue_frames=10_000, policy=SlowClientPolicy.drop_oldest,
        )  # fmt: skip
        sub = hub.subscribe(SensorFilter()).subscriber

        def dispatch() -> None:
            hub.dispatch(decode_batch(1, payload, "epoch"))
            sub.take()

        steps["hub (frames from the envelope, dispatch)"] = timed(dispatch, budget)
        messages = decode_batch(1, payload, "epoch")
        steps["batch=true frame (join)"] = timed(
            lambda: '{"type":"predictions","items":[' + ",".join(m.frame for m in messages) + "]}",
            budget,
        )

    asyncio.run(run_async_steps())
    steps["model stage (run_batch, in a worker)"] = timed(
        lambda: inference.run_batch(readings, []), budget
    )
    total = 0.0
    for name, seconds in steps.items():
        per_reading_us = seconds / N * 1e6
        if not name.startswith("model stage"):
            total += per_reading_us
        results.row("hotpath", name, per_reading_us, "us/reading")
    results.row("hotpath", "service process, sum of the steps above", total, "us/reading")
    results.row(
        "hotpath", "bound on readings/s from one service process", 1e6 / total, "readings/s"
    )
    results.write(args.json)


if __name__ == "__main__":
    main()
