"""The service process's cost per reading, step by step, in one process and on one core.

Everything but the model runs in the service process, on one event loop and under one GIL,
so the sum of these steps bounds the end-to-end throughput whatever the number of model
processes: parse a 1,000-reading body, admit it (each shard's share packed as it is queued:
``wire.pack``), join a batch's shares into the blob a model process takes (``wire.join``; the
executor then pickles one bytes object), unpickle what
comes back (a ``BatchOutcome``: one blob and a few counts), publish it, make the frames and
dispatch them in the hub, and join a ``batch=true`` frame. Each step is timed alone on the
same data, median of repeats. The model stage's own cost (``run_batch`` in a model process)
is given beside, on fresh in-order batches past every sensor's first fit, fits included.

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
from app.pipeline import shard, wire
from app.pipeline.hub import PredictionHub, SensorFilter
from app.pipeline.ingest import Ingestor, RecentIds, ShardQueue
from app.pipeline.publish import Publisher
from app.schemas import parse_json
from bench._common import Results, parse_args
from bench._workload import Stream, first_fit_readings, sensor_ids

N = 1000
SENSORS = 100


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
    settings = Settings()
    shard.init_process(settings.model, settings.model_options())
    stream = Stream(sensor_ids(SENSORS))
    for batch in stream.until(first_fit_readings(settings.model_options()) + 16, N):
        shard.run_batch(wire.encode_readings(batch))
    # The model stage: CPU time on fresh batches (a batch replayed would take the late path).
    model_batches = stream.until(stream.per_sensor + (30 if args.quick else 120), N)
    cpu0 = time.process_time()
    outcomes = [shard.run_batch(wire.encode_readings(b)) for b in model_batches]
    model_s = (time.process_time() - cpu0) / len(model_batches)
    body = stream.body(N)
    readings = parse_json(body, max_items=10_000)
    outcome = outcomes[-1]
    outcome_bytes = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)

    steps: dict[str, float] = {}
    steps["parse + validate (msgspec)"] = timed(lambda: parse_json(body, max_items=10_000), budget)

    def admit() -> None:
        queues = [ShardQueue(10**9) for _ in range(2)]
        Ingestor(queues, RecentIds(600, 10**6)).offer(readings)

    async def run_async_steps() -> None:
        steps["admit (dedup, shard, pack, queue)"] = timed(admit, budget)
        shares = [wire.pack(readings[: N // 2]), wire.pack(readings[N // 2 :])]
        steps["batch for a model process (join the shares, pickle the call)"] = timed(
            lambda: pickle.dumps((shard.run_batch, (wire.join(shares).blob,), {}), protocol=5),
            budget,
        )
        steps["unpickle the outcome"] = timed(lambda: pickle.loads(outcome_bytes), budget)
        backend = MemoryBackend(max_pending_messages=10**9)
        publisher = Publisher(backend)
        async with backend.subscribe(wire.CHANNEL) as stream_:
            del stream_  # a subscription only so that publish has somewhere to append

            def publish() -> None:
                coro = publisher.publish(outcome.payload, outcome.messages)
                try:
                    coro.send(None)
                except StopIteration:
                    pass

            steps["publish (memory backend)"] = timed(publish, budget)
        hub = PredictionHub(
            backend, history_max_frames=100_000, history_max_age_s=3600,
            subscriber_queue_frames=10_000, policy=SlowClientPolicy.drop_oldest,
        )  # fmt: skip
        sub = hub.subscribe(SensorFilter()).subscriber

        def dispatch() -> None:
            hub.dispatch(wire.decode_batch(1, outcome.payload, "epoch"))
            sub.take()

        steps["hub (frames from the payload, dispatch)"] = timed(dispatch, budget)
        messages = wire.decode_batch(1, outcome.payload, "epoch")
        steps["batch=true frame (join)"] = timed(
            lambda: '{"type":"predictions","items":[' + ",".join(m.frame for m in messages) + "]}",
            budget,
        )

    asyncio.run(run_async_steps())
    total = 0.0
    for name, seconds in steps.items():
        per_reading_us = seconds / N * 1e6
        total += per_reading_us
        results.row("hotpath", name, per_reading_us, "us/reading")
    results.row("hotpath", "service process, sum of the steps above", total, "us/reading")
    results.row(
        "hotpath", "bound on readings/s from one service process", 1e6 / total, "readings/s"
    )
    results.row(
        "hotpath", "model stage (run_batch in a model process, fits included)",
        model_s / N * 1e6, "us/reading",
    )  # fmt: skip
    results.write(args.json)


if __name__ == "__main__":
    main()
