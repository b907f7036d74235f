"""The model stage alone: CPU cost per reading of ``run_batch``, in this process.

What one model process does per reading, with no HTTP, queues or IPC: unpack the batch blob,
score each reading, refit inline where the sensor's own cadence says (count of readings and
event time, the service's defaults), pack the prediction bodies. Batches of 1,000 readings
spread over 100 or 1,000 sensors, single-value and 4-channel, each sensor's readings in order
with ``ts`` rising 1 s apart (``bench/_workload.py``). Timing starts once every sensor has had
its first fit and includes every fit after it; CPU time of this process (``process_time``),
so other load on the machine does not count. The fits per 1,000 readings in the timed window
are reported beside: early in a sensor's life the default model refits each time its readings
double, later every 600 s of event time (600 readings at 1 Hz), so a short window holds more
fits than the steady state (the figure errs on the costly side).

Run: ``python -m bench.model_stage [--quick] [--json PATH] [--model module:Class]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from app.config import Settings
from app.pipeline import shard, wire
from bench._common import Results
from bench._workload import Stream, first_fit_readings, sensor_ids

BATCH = 1_000


def run(model: str, sensors: int, channels: int, per_sensor: int) -> tuple[float, float]:
    """(µs of CPU per reading, fits per 1,000 readings) over the timed window."""
    options = Settings().model_options()
    shard.init_process(model, options)
    stream = Stream(sensor_ids(sensors), channels=channels)
    for batch in stream.until(first_fit_readings(options) + 16, BATCH):
        shard.run_batch(wire.encode_readings(batch))
    work = stream.until(per_sensor, BATCH)
    count = sum(len(b) for b in work)
    fits = 0
    started = time.process_time()
    for batch in work:
        fits += len(shard.run_batch(wire.encode_readings(batch)).fit_seconds)
    elapsed = time.process_time() - started
    return elapsed / count * 1e6, fits / count * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default=Settings().model)
    parser.add_argument("--json", type=Path, help="write the figures here (bench/_common.py)")
    parser.add_argument("--quick", action="store_true", help="a shorter window per sensor")
    args = parser.parse_args()
    per_sensor = 120 if args.quick else 300
    results = Results("model_stage")
    results.note(
        f"{args.model}, batches of {BATCH:,}, timed from reading {first_fit_readings() + 16} "
        f"to {per_sensor} of each sensor, one process"
    )
    for channels in (1, 4):
        for sensors in (100, 1_000):
            us, fits = run(args.model, sensors, channels, per_sensor)
            label = f"{sensors:,} sensors x {channels} channel{'s' if channels > 1 else ''}"
            results.row("model stage", f"CPU per reading, {label}", us, "us/reading")
            results.row("model stage", f"readings/s per process, {label}", 1e6 / us, "readings/s")
            results.row("model stage", f"fits per 1,000 readings, {label}", fits, "fits")
    results.write(args.json)


if __name__ == "__main__":
    main()
