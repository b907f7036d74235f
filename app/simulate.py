"""Synthetic sensors with labelled anomalies, and ``sensorcast simulate`` that posts them.

Each sensor is a daily cycle plus noise, and for half of them (the ``wander`` profile) a
trend and a random walk too. Sensors with several channels share one latent signal with
their own gain, offset and noise, so the channels are correlated. Readings are spaced
``interval_s`` apart in *simulated* time with ±20 % jitter, so a day passes in 288 readings at
the default five minutes, and ``ts`` is irregular.

Anomalies start at random (``anomaly_rate`` per reading, one at a time per sensor, at least
``quiet_readings`` apart) on one channel, a sustained fault on several, and each is labelled
with its kind and the readings it covers:

========== ===================================================== ===============
kind       effect                                                readings
========== ===================================================== ===============
spike      one reading off by 6-12 noise σ                       1
level      the level shifts by 6-10 σ, then comes back           20-60
drift      a ramp up to 8-12 σ, then back                        60-120
stuck      the value freezes at its last reading                 20-60
noise      the noise grows 3-5 fold                              10-30
sustained  2 channels or more (the one of a single-channel       60-600
           sensor) shift together by 4-8 σ each, for minutes
           at 1 Hz, then come back
========== ===================================================== ===============

The kinds are equally likely; ``kinds`` narrows them (say, to sustained faults alone). A seed
gives the same events as before ``sustained`` was added, up to the first one drawn sustained.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import math
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from app.models.base import FloatArray

KINDS = ("spike", "level", "drift", "stuck", "noise", "sustained")
DAY_S = 86_400.0
CHANNEL_NAMES = ("temperature", "pressure", "flow", "vibration")


@dataclass
class Event:
    """One injected anomaly: readings ``start`` (inclusive) to ``end`` (exclusive)."""

    sensor_id: str
    kind: str
    start: int
    end: int
    channel: int
    """The channel it affects (a sustained fault: the first of ``channels``)."""
    magnitude: float
    """Its size on ``channel``, in the values' units (a stuck event: the value held)."""
    channels: tuple[int, ...] = ()
    """Every channel it affects: ``(channel,)`` but for a sustained fault, which shifts each
    of its channels by the same multiple of that channel's noise σ."""

    def __post_init__(self) -> None:
        if not self.channels:
            self.channels = (self.channel,)


@dataclass
class SensorSim:
    """One synthetic sensor; :meth:`take` makes its next readings.

    Examples:
        >>> sim = SensorSim("pump-1", channels=2, seed=3, anomaly_rate=0.0)
        >>> ts, values, labels = sim.take(5)
        >>> values.shape, labels
        ((5, 2), ['', '', '', '', ''])
    """

    sensor_id: str
    channels: int = 1
    seed: int = 0
    anomaly_rate: float = 0.005
    interval_s: float = 300.0
    start_ts: float = 1_780_000_000.0
    profile: str = "seasonal"
    """``seasonal`` (daily cycle and noise) or ``wander`` (also a trend and a random walk)."""
    kinds: tuple[str, ...] = KINDS
    """The kinds of anomaly drawn, equally likely."""
    quiet_readings: int = 0
    """Readings after an anomaly ends before the next may start."""
    events: list[Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise ValueError(
                f"unknown anomaly kinds {unknown}: choose among {', '.join(KINDS)}"
                if unknown
                else "kinds is empty: choose among " + ", ".join(KINDS)
            )
        rng = self._rng = np.random.default_rng(self.seed)
        c = self.channels
        self.names: tuple[str, ...] = (
            ("value",)
            if c == 1
            else tuple(CHANNEL_NAMES[i] if i < len(CHANNEL_NAMES) else f"ch{i}" for i in range(c))
        )
        self.noise = rng.uniform(0.5, 3.0, c)
        self.level = rng.uniform(10.0, 100.0, c)
        self.gain = rng.uniform(0.6, 1.4, c)
        self.gain[0] = 1.0
        self.amplitude = rng.uniform(4.0, 12.0) * float(self.noise[0])
        self.phase = rng.uniform(0, 2 * math.pi)
        wander = self.profile == "wander"
        self.trend_per_day = rng.uniform(-2.0, 2.0) * float(self.noise[0]) if wander else 0.0
        self.walk_step = rng.uniform(0.02, 0.08) * float(self.noise[0]) if wander else 0.0
        self._walk = 0.0
        self._ts = self.start_ts
        self._n = 0
        self._last = np.zeros(c)
        self._active: Event | None = None
        self._quiet_until = 0

    def take(self, k: int) -> tuple[FloatArray, FloatArray, list[str]]:
        """The next ``k`` readings: ``ts`` (k,), values (k, channels), and each one's label."""
        rng = self._rng
        gaps = self.interval_s * rng.uniform(0.8, 1.2, k)
        ts = self._ts + np.cumsum(gaps)
        self._ts = float(ts[-1])
        walk = self._walk + np.cumsum(rng.normal(0.0, 1.0, k) * self.walk_step)
        self._walk = float(walk[-1])
        days = (ts - self.start_ts) / DAY_S
        latent = (
            self.amplitude * np.sin(2 * math.pi * ts / DAY_S + self.phase)
            + self.trend_per_day * days
            + walk
        )
        values = (
            self.level
            + latent[:, None] * self.gain
            + rng.normal(size=(k, self.channels)) * (self.noise)
        )
        labels = [""] * k
        starts = rng.random(k) < self.anomaly_rate
        for i in range(k):
            n = self._n + i
            event = self._active
            if event is not None and n >= event.end:
                event = self._active = None
            if event is None and starts[i] and n > 0 and n >= self._quiet_until:
                event = self._active = self._new_event(n)
            if event is not None:
                self._apply(event, n, values[i])
                labels[i] = event.kind
            self._last = values[i].copy()
        self._n += k
        return ts, values, labels

    def _draw_kind(self) -> str:
        rng = self._rng
        if self.kinds != KINDS:
            return self.kinds[int(rng.integers(len(self.kinds)))]
        # Each earlier kind gives a sixth of its draws to the last one added: a draw over
        # 5 × 6 values whose quotient by 6 is the draw over 5 the same seed made before
        # (numpy's bounded integers: floor(u·30) // 6 == floor(u·5)), so an event that is not
        # drawn sustained keeps its kind.
        earlier, n = len(KINDS) - 1, len(KINDS)
        j = int(rng.integers(earlier * n))
        return KINDS[-1] if j % n == n - 1 else KINDS[j // n]

    def _new_event(self, n: int) -> Event:
        rng = self._rng
        kind = self._draw_kind()
        if kind == "sustained":
            return self._new_sustained(n)
        channel = int(rng.integers(self.channels))
        sign = 1.0 if rng.random() < 0.5 else -1.0
        sigma = float(self.noise[channel])
        length, magnitude = {
            "spike": (1, rng.uniform(6, 12) * sigma * sign),
            "level": (int(rng.integers(20, 61)), rng.uniform(6, 10) * sigma * sign),
            "drift": (int(rng.integers(60, 121)), rng.uniform(8, 12) * sigma * sign),
            "stuck": (int(rng.integers(20, 61)), 0.0),
            "noise": (int(rng.integers(10, 31)), rng.uniform(3, 5) * sigma),
        }[kind]
        event = Event(self.sensor_id, kind, n, n + length, channel, float(magnitude))
        if kind == "stuck":
            event.magnitude = float(self._last[channel])
        return self._started(event)

    def _new_sustained(self, n: int) -> Event:
        """Two channels or more (all of them, at random), or the one of a single-channel
        sensor, shifted by the same 4-8 σ of each channel's noise, in the same direction."""
        rng = self._rng
        c = self.channels
        count = 1 if c == 1 else int(rng.integers(2, c + 1))
        chosen = tuple(sorted(int(i) for i in rng.choice(c, count, replace=False)))
        sign = 1.0 if rng.random() < 0.5 else -1.0
        sigmas = rng.uniform(4, 8) * sign
        length = int(rng.integers(60, 601))
        channel = chosen[0]
        magnitude = float(sigmas * self.noise[channel])
        return self._started(
            Event(self.sensor_id, "sustained", n, n + length, channel, magnitude, chosen)
        )

    def _started(self, event: Event) -> Event:
        self.events.append(event)
        self._quiet_until = event.end + self.quiet_readings
        return event

    def _apply(self, event: Event, n: int, row: FloatArray) -> None:
        ch = event.channel
        if event.kind in ("spike", "level"):
            row[ch] += event.magnitude
        elif event.kind == "drift":
            row[ch] += event.magnitude * (n - event.start + 1) / (event.end - event.start)
        elif event.kind == "stuck":
            row[ch] = event.magnitude
        elif event.kind == "sustained":
            sigmas = event.magnitude / self.noise[ch]
            for o in event.channels:
                row[o] += sigmas * self.noise[o]
        else:
            row[ch] += self._rng.normal(0.0, event.magnitude)

    def readings(
        self, ts: FloatArray, values: FloatArray, first: int, run_id: str = ""
    ) -> list[dict[str, Any]]:
        """Request items for readings made by :meth:`take`, numbered from ``first``; with a
        ``run_id`` the ids are ``RUN-N``, so another run's readings are not duplicates."""
        out: list[dict[str, Any]] = []
        prefix = f"{run_id}-" if run_id else ""
        for i, (t, row) in enumerate(zip(ts.tolist(), values.tolist(), strict=True)):
            item: dict[str, Any] = {
                "sensor_id": self.sensor_id, "ts": t, "id": f"{prefix}{first + i}",
            }  # fmt: skip
            if self.channels == 1:
                item["value"] = row[0]
            else:
                item["values"] = dict(zip(self.names, row, strict=True))
            out.append(item)
        return out


def make_sensors(
    count: int, *, channels: int = 1, seed: int = 0, anomaly_rate: float = 0.005,
    interval_s: float = 300.0, start_ts: float | None = None, prefix: str = "sim",
) -> list[SensorSim]:  # fmt: skip
    """``count`` sensors, alternately ``seasonal`` and ``wander``; reproducible from ``seed``."""
    start = start_ts if start_ts is not None else time.time() - 86_400 * 30
    return [
        SensorSim(
            f"{prefix}-{i}",
            channels=channels,
            seed=seed * 1_000_003 + i,
            anomaly_rate=anomaly_rate,
            interval_s=interval_s,
            start_ts=start,
            profile="seasonal" if i % 2 == 0 else "wander",
        )
        for i in range(count)
    ]


# ---------------------------------------------------------------------------------------------
# sensorcast simulate


@dataclass
class Tally:
    sent: int = 0
    accepted: int = 0
    duplicates: int = 0
    posts: int = 0
    retries: int = 0
    failed: int = 0
    labelled: Counter[str] = field(default_factory=Counter)


class _Csv:
    def __init__(self, out: TextIO, sensors: list[SensorSim]) -> None:
        names = sorted({name for s in sensors for name in s.names})
        self.names = names
        self.writer = csv.writer(out)
        self.writer.writerow(["sensor_id", "id", "ts", *names, "anomaly"])

    def write(self, items: list[dict[str, Any]], labels: list[str]) -> None:
        for item, label in zip(items, labels, strict=True):
            values = item.get("values") or {"value": item["value"]}
            self.writer.writerow(
                [item["sensor_id"], item["id"], repr(item["ts"])]
                + [repr(values[n]) if n in values else "" for n in self.names]
                + [label]
            )


async def _post(client: Any, url: str, items: list[dict[str, Any]], tally: Tally) -> None:
    """POST one batch, retrying on 503 (ids make retries safe) until accepted or refused."""
    import httpx

    for _ in range(100):
        try:
            response = await client.post(url, json=items)
        except httpx.HTTPError:
            tally.retries += 1
            await asyncio.sleep(0.5)
            continue
        tally.posts += 1
        if response.status_code == 202:
            body = response.json()
            tally.accepted += body["accepted"]
            tally.duplicates += body["duplicates"]
            return
        if response.status_code == 503:
            tally.retries += 1
            await asyncio.sleep(min(float(response.headers.get("retry-after", 1)), 1.0))
            continue
        tally.failed += len(items)
        print(f"\nPOST refused: {response.status_code} {response.text[:200]}", file=sys.stderr)
        return
    tally.failed += len(items)


async def run(args: argparse.Namespace) -> int:
    """Post simulated readings to ``args.url`` for ``args.duration`` seconds at ``args.rate``."""
    import httpx

    sensors = make_sensors(
        args.sensors, channels=args.channels, seed=args.seed, anomaly_rate=args.anomaly_rate,
        interval_s=args.interval, prefix=args.prefix,
    )  # fmt: skip
    url = args.url.rstrip("/")
    if not url.endswith("/v1/readings"):
        url += "/v1/readings"
    headers = {"x-api-key": args.key} if args.key else {}
    tally = Tally()
    run_id = "" if args.no_run_id else (args.run_id or secrets.token_hex(4))
    # Opened before the loop starts; rows are then written a batch at a time.
    csv_file = open(args.csv, "w", newline="") if args.csv else None  # noqa: ASYNC230
    writer = _Csv(csv_file, sensors) if csv_file else None
    # Sensors are split over a few posting tasks; each posts its sensors' readings in order,
    # so per-sensor order holds while requests overlap.
    lanes = max(1, min(args.concurrency, len(sensors)))
    groups = [sensors[i::lanes] for i in range(lanes)]
    started = time.monotonic()
    deadline = started + args.duration
    per_lane_rate = args.rate / lanes if args.rate > 0 else 0.0
    numbers = dict.fromkeys((s.sensor_id for s in sensors), 0)

    async def lane(group: list[SensorSim], client: httpx.AsyncClient) -> None:
        sent = 0
        per_sensor = max(1, args.batch // len(group))
        while time.monotonic() < deadline:
            items: list[dict[str, Any]] = []
            labels: list[str] = []
            for sim in group:
                ts, values, labs = sim.take(per_sensor)
                items += sim.readings(ts, values, numbers[sim.sensor_id], run_id)
                numbers[sim.sensor_id] += per_sensor
                labels += labs
            tally.sent += len(items)
            tally.labelled.update(label for label in labels if label)
            if writer is not None:
                writer.write(items, labels)
            await _post(client, url, items, tally)
            sent += len(items)
            if per_lane_rate:
                ahead = sent / per_lane_rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(min(ahead, max(0.0, deadline - time.monotonic())))

    async def progress() -> None:
        while True:
            await asyncio.sleep(0.5)
            _progress_line(tally, time.monotonic() - started, sensors)

    async with httpx.AsyncClient(timeout=30, headers=headers) as client:
        reporter = asyncio.create_task(progress())
        try:
            await asyncio.gather(*(lane(g, client) for g in groups))
        finally:
            reporter.cancel()
            if csv_file is not None:
                csv_file.close()
    elapsed = time.monotonic() - started
    _progress_line(tally, elapsed, sensors)
    print(file=sys.stderr)
    events = Counter(e.kind for s in sensors for e in s.events)
    print(
        f"sent {tally.sent} readings from {len(sensors)} sensors in {elapsed:.1f} s "
        f"({tally.sent / max(elapsed, 1e-9):,.0f}/s): accepted {tally.accepted}, "
        f"duplicates {tally.duplicates}, failed {tally.failed}, "
        f"{tally.posts} requests, {tally.retries} retries"
    )
    print(
        "anomalies injected: "
        + (", ".join(f"{k} {events[k]}" for k in KINDS if events[k]) or "none")
        + f" ({sum(tally.labelled.values())} labelled readings)"
        + (f"; labelled CSV in {args.csv}" if args.csv else "")
    )
    if run_id:
        print(f"reading ids: {run_id}-N (--run-id {run_id} sends the same ids again)")
    return _verdict(tally, run_id)


def _verdict(tally: Tally, run_id: str) -> int:
    """The exit status: 1 with a line on stderr saying why when a reading failed, or when
    nothing that was sent was accepted (which would leave a CSV of readings never predicted).

    Examples:
        >>> _verdict(Tally(sent=10, accepted=10), "ab12"), _verdict(Tally(), "")
        (0, 0)
    """
    if tally.failed:
        print(f"error: {tally.failed} readings were refused or not delivered", file=sys.stderr)
        return 1
    if tally.sent and not tally.accepted:
        if tally.duplicates == tally.sent:
            why = (
                "all were duplicates of readings the service accepted earlier (same sensor_id "
                "and id); a run id in the ids (the default, without --no-run-id) or another "
                "--run-id makes them new"
            )
        else:
            why = f"{tally.duplicates} were duplicates, the rest got no answer"
        print(f"error: none of the {tally.sent} readings sent was accepted: {why}", file=sys.stderr)
        return 1
    return 0


def _progress_line(tally: Tally, elapsed: float, sensors: list[SensorSim]) -> None:
    events = sum(len(s.events) for s in sensors)
    sys.stderr.write(
        f"\r{elapsed:6.1f} s  sent {tally.sent:>9,}  accepted {tally.accepted:>9,}  "
        f"{tally.sent / max(elapsed, 1e-9):>8,.0f}/s  anomalies {events:>5}  "
        f"retries {tally.retries}  failed {tally.failed}"
    )
    sys.stderr.flush()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``sensorcast simulate``."""
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the service's base URL")
    p.add_argument("--sensors", type=int, default=10)
    p.add_argument("--rate", type=float, default=100.0, help="readings/s in all (0: no limit)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds to run")
    p.add_argument("--batch", type=int, default=100, help="readings per request")
    p.add_argument(
        "--anomaly-rate", dest="anomaly_rate", type=float, default=0.005,
        help="chance that an anomaly starts at each reading of a sensor",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels", type=int, default=1, help="channels per sensor (1: 'value')")
    p.add_argument("--interval", type=float, default=300.0, help="simulated seconds per reading")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--csv", help="also write every reading with its label to this CSV file")
    p.add_argument("--key", help="API key, where keys are set")
    p.add_argument("--prefix", default="sim", help="sensor ids are PREFIX-0, PREFIX-1, ...")
    ids = p.add_mutually_exclusive_group()
    ids.add_argument(
        "--run-id",
        help="reading ids are RUN_ID-0, RUN_ID-1, ... (default: random per run, so a rerun "
        "within the service's dedup window is not taken for retries)",
    )
    ids.add_argument(
        "--no-run-id", dest="no_run_id", action="store_true",
        help="reading ids are 0, 1, ...: a rerun with the same seed resends the same readings",
    )  # fmt: skip
