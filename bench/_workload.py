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
        self._heads: list[bytes] = []
        self._pieces: list[list[bytes]] | None = None
        """Per sensor, each value's part of its JSON object (made by the first ``body``)."""

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
        """The next ``count`` readings as a JSON request body (what a sensor gateway posts).

        The same bytes as ``msgspec.json`` encoding each reading's object, put together from
        pieces encoded once (each sensor's id, each of its values, each round's ``ts``), so
        that a load generator costs a fraction of the service it loads.
        """
        if self._pieces is None:
            single = len(self.names) == 1

            def piece(row: tuple[float, ...]) -> bytes:
                if single:
                    return b',"value":' + _json.encode(row[0]) + b"}"
                values = dict(zip(self.names, row, strict=True))
                return b',"values":' + _json.encode(values) + b"}"

            self._pieces = [[piece(row) for row in values] for values in self._values]
            self._heads = [b'{"sensor_id":' + _json.encode(sid) + b',"ts":' for sid in self.sensors]
        heads, pieces = self._heads, self._pieces
        n_sensors = len(self.sensors)
        items: list[bytes] = []
        ts_text = b""
        for n in range(self._next, self._next + count):
            s, k = n % n_sensors, n // n_sensors
            if s == 0 or not ts_text:
                ts_text = _json.encode(self.start_ts + k * self.interval_s)
            items.append(heads[s] + ts_text + pieces[s][k % CYCLE])
        self._next += count
        return b"[" + b",".join(items) + b"]"


_json = msgspec.json.Encoder()
