"""Honest work for the benchmarks: each sensor's readings in order, with rising timestamps.

A benchmark that replays the same batches with fixed timestamps measures the models'
late-reading path (a reading older than its sensor's latest skips the window and detector
work) after the first pass. Every benchmark of the model stage therefore draws its readings
from a :class:`Stream`: sensors interleaved as live traffic is, each sensor's ``ts`` rising by
``interval_s`` (1 s: a sensor at 1 Hz, so the models refit on the service's default cadence,
by count and by event time, as they would live). Values come from the project's simulator
(seasonal and wandering sensors with a few anomalies), computed once per sensor and cycled,
so producing readings costs next to nothing beside the work measured.
"""

from __future__ import annotations

import itertools
from typing import Any

import msgspec

from app.models.base import ModelOptions
from app.pipeline.routing import shard_of
from app.schemas import Reading
from app.simulate import make_sensors

START_TS = 1_780_000_000.0
INTERVAL_S = 1.0
CYCLE = 256
"""Values simulated per sensor, then reused in turn (timestamps keep rising)."""


def first_fit_readings(options: ModelOptions | None = None) -> int:
    """Readings a sensor needs before its first fit (the default model's own floor included)."""
    options = options or ModelOptions()
    from app.models.ridge import WINDOW

    return max(options.warmup_readings, WINDOW + 16)


def sensor_ids(count: int, *, shard: int = 0, shards: int = 1, prefix: str = "b") -> list[str]:
    """``count`` sensor ids that the service routes to ``shard`` of ``shards``."""
    out: list[str] = []
    for n in itertools.count():
        sid = f"{prefix}-{n}"
        if shard_of(sid, shards) == shard:
            out.append(sid)
            if len(out) == count:
                return out
    raise AssertionError("unreachable")


class Stream:
    """An endless, reproducible stream of readings of ``sensors``, round robin, in order."""

    def __init__(
        self,
        sensors: list[str],
        *,
        channels: int = 1,
        interval_s: float = INTERVAL_S,
        start_ts: float = START_TS,
        seed: int = 7,
    ) -> None:
        self.sensors = sensors
        self.interval_s = interval_s
        self.start_ts = start_ts
        sims = make_sensors(len(sensors), channels=channels, seed=seed, anomaly_rate=0.002)
        self.names: tuple[str, ...] = tuple(sims[0].names)
        self._values: list[list[tuple[float, ...]]] = [
            [tuple(row) for row in sim.take(CYCLE)[1].tolist()] for sim in sims
        ]
        self._next = 0
        """Index of the next reading in the whole stream (sensor = index % len(sensors))."""

    @property
    def per_sensor(self) -> int:
        """Readings each sensor has had so far (the least of them)."""
        return self._next // len(self.sensors)

    def take(self, count: int) -> list[Reading]:
        """The next ``count`` readings."""
        n_sensors = len(self.sensors)
        out: list[Reading] = []
        append = out.append
        for n in range(self._next, self._next + count):
            s, k = n % n_sensors, n // n_sensors
            ts = self.start_ts + k * self.interval_s
            append(Reading(self.sensors[s], None, ts, self.names, self._values[s][k % CYCLE], ts))
        self._next += count
        return out

    def until(self, per_sensor: int, batch: int) -> list[list[Reading]]:
        """Batches of ``batch`` until every sensor has had ``per_sensor`` readings."""
        out: list[list[Reading]] = []
        while self._next < per_sensor * len(self.sensors):
            out.append(self.take(min(batch, per_sensor * len(self.sensors) - self._next)))
        return out

    def body(self, count: int) -> bytes:
        """The next ``count`` readings as a JSON request body (what a sensor gateway posts)."""
        items: list[dict[str, Any]] = []
        single = len(self.names) == 1
        for r in self.take(count):
            if single:
                items.append({"sensor_id": r.sensor_id, "ts": r.ts, "value": r.values[0]})
            else:
                values = dict(zip(r.channels, r.values, strict=True))
                items.append({"sensor_id": r.sensor_id, "ts": r.ts, "values": values})
        return _json.encode(items)


_json = msgspec.json.Encoder()
