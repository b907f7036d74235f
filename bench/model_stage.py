"""Throughput of the model stage alone: ``run_batch`` in a tight loop, in this process.

No HTTP, no queues, no IPC: what one worker process can score per second, model and
prediction encoding included. Batches of 1,000 readings spread over 100 or 1,000 sensors,
single-value and 4-channel. Sensors are warmed up and fitted first; the loop then also
ships the training jobs it produces to ``fit`` and installs the results with the next batch,
as the service does (the fits themselves are not timed).

    .venv/bin/python bench/model_stage.py [--model app.models.ridge:RidgeForecaster]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from app.models.base import ModelOptions
from app.pipeline import inference
from app.schemas import Reading
from app.simulate import make_sensors


def batches(sensors: int, channels: int, readings: int, batch: int) -> list[list[Reading]]:
    sims = make_sensors(sensors, channels=channels, seed=7, anomaly_rate=0.002, start_ts=1.78e9)
    per_sensor = readings // sensors
    columns = []
    for sim in sims:
        ts, values, _ = sim.take(per_sensor)
        columns.append([
            Reading(sim.sensor_id, str(i), t, sim.names, tuple(row), t)
            for i, (t, row) in enumerate(zip(ts.tolist(), values.tolist(), strict=True))
        ])  # fmt: skip
    # Interleave the sensors, as live traffic would.
    flat = [columns[s][i] for i in range(per_sensor) for s in range(sensors)]
    return [flat[i : i + batch] for i in range(0, len(flat), batch)]


def run(model: str, sensors: int, channels: int, readings: int, batch: int) -> float:
    inference.init_worker(model, ModelOptions())
    work = batches(sensors, channels, readings, batch)
    warm = len(work) // 3
    installs: list[tuple[str, object]] = []
    scored = 0
    elapsed = 0.0
    for n, readings_ in enumerate(work):
        started = time.process_time()
        result = inference.run_batch(readings_, installs)
        if n >= warm:
            elapsed += time.process_time() - started
            scored += len(readings_)
        installs = [(job.sensor_id, inference.fit_job(model, job.job)) for job in result.jobs]
    return scored / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="app.models.ridge:RidgeForecaster")
    parser.add_argument("--readings", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--json", type=Path, help="write the figures here (bench/_common.py)")
    parser.add_argument("--quick", action="store_true", help="fewer readings")
    args = parser.parse_args()
    if args.quick:
        args.readings = min(args.readings, 60_000)
    rows: list[dict[str, object]] = []
    print(f"model stage, {args.model}, batches of {args.batch}, one process")
    print(f"{'sensors':>8} {'channels':>9} {'readings/s':>12}")
    for channels in (1, 4):
        for sensors in (100, 1_000):
            rate = run(args.model, sensors, channels, args.readings, args.batch)
            print(f"{sensors:>8} {channels:>9} {rate:>12,.0f}", flush=True)
            rows.append({
                "item": "model stage", "measure": f"{sensors:,} sensors x {channels} channel(s)",
                "value": rate, "unit": "readings/s per process",
            })  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
