"""Alarm coverage on sustained faults: raised once, soon, held, cleared soon after, few false.

Simulated 1 Hz sensors (``app/simulate.py``) with 1 and 4 channels, several seeds, half of
them ``seasonal`` and half ``wander``: a long normal stretch (``NORMAL`` readings), then only
``sustained`` faults (2 channels or more, or the one channel, shifted together by 4-8 noise σ
for 60-600 readings), at least ``QUIET`` readings apart. Each sensor's readings are fed in
``ts`` order to the default model class in this process, with the service's default settings.
A sensor's predictions and alarms depend only on its readings in ``ts`` order and the
settings (the contract's determinism), so this is what the service says; a subset of the
sensors is also posted in bulk to a running ``sensorcast serve`` and its alarm frames,
collected over the WebSocket, are compared with the in-process events one for one.

Per fault (those that start once alarms are on, at twice the warm-up, and end with room for
the clear before the data ends):

- **one alarm**: exactly one ``raised`` event from its start to ``CLEAR_TARGET`` readings
  after its end, and no alarm already active at its start;
- **raise delay**: readings of the fault taken until the one that raised it, that one
  included (3 at best: 3 of the last 6 readings must be anomalies);
- **held**: the fraction of the fault's readings taken while an alarm is active;
- **clear delay**: readings after the fault's last one until the one that cleared the alarm,
  that one included (10 at best: 10 normal readings in a row clear it).

False alarms: ``raised`` events outside every fault (from its start to ``CLEAR_TARGET``
readings after its end), per 10,000 normal readings (those from twice the warm-up on, outside
every fault and its ``CLEAR_TARGET`` readings after), pooled over the sensors.

    .venv/bin/python -m bench.alarms [--quick] [--json PATH]
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import numpy as np
import websockets

from app.config import Settings
from app.models.alarms import AlarmEvent
from app.models.ridge import RidgeForecaster
from app.simulate import Event, SensorSim
from bench._common import Results, parse_args, percentile, service

INTERVAL_S = 1.0
NORMAL = 3_000
"""Normal readings before the first fault may start."""
QUIET = 300
"""Normal readings at least between two faults."""
FAULT_RATE = 1 / 600
"""Chance per reading that a fault starts, outside the quiet stretches."""
RAISE_TARGET = 10
CLEAR_TARGET = 30
HELD_TARGET = 0.9
FALSE_TARGET = 1.0
"""False alarm episodes per sensor per 10,000 normal readings."""
START_TS = 1_780_000_000.0
CHUNK = 1_000
"""Readings per call to the model, and per request to the service."""


@dataclass
class Sensor:
    """One simulated sensor's readings and its faults."""

    sim: SensorSim
    ts: np.ndarray
    values: np.ndarray
    faults: list[Event]

    @property
    def sensor_id(self) -> str:
        return self.sim.sensor_id


@dataclass
class Outcome:
    """What the alarms made of one sensor's faults."""

    faults: int = 0
    one_alarm: int = 0
    raise_delays: list[int] = field(default_factory=list)
    held: list[float] = field(default_factory=list)
    clear_delays: list[int] = field(default_factory=list)
    never_cleared: int = 0
    false_alarms: int = 0
    normal_readings: int = 0


def make_sensor(channels: int, seed: int, readings: int) -> Sensor:
    """A 1 Hz sensor: ``NORMAL`` normal readings, then sustained faults ``QUIET`` apart."""
    profile = "seasonal" if seed % 2 == 0 else "wander"
    sim = SensorSim(
        f"alarms-{channels}ch-{seed}", channels=channels, seed=seed, anomaly_rate=0.0,
        interval_s=INTERVAL_S, start_ts=START_TS, profile=profile, kinds=("sustained",),
        quiet_readings=QUIET,
    )  # fmt: skip
    ts0, values0, _ = sim.take(NORMAL)
    sim.anomaly_rate = FAULT_RATE
    ts1, values1, _ = sim.take(readings - NORMAL)
    ts = np.concatenate([ts0, ts1])
    values = np.concatenate([values0, values1])
    return Sensor(sim, ts, values, list(sim.events))


def run_model(sensor: Sensor, settings: Settings) -> list[tuple[int, AlarmEvent]]:
    """Feed the readings in ``ts`` order to the default model; its alarm events by row."""
    model = RidgeForecaster(sensor.sensor_id, sensor.sim.names, settings.model_options())
    events: list[tuple[int, AlarmEvent]] = []
    for i in range(0, len(sensor.ts), CHUNK):
        obs = model.observe(sensor.ts[i : i + CHUNK], sensor.values[i : i + CHUNK])
        events += [(i + row, event) for row, event in obs.alarms or []]
    return events


def score(sensor: Sensor, events: list[tuple[int, AlarmEvent]], alarms_from: int) -> Outcome:
    """Judge one sensor's alarm events against its faults."""
    n = len(sensor.ts)
    active = np.zeros(n, dtype=bool)
    state, at = False, 0
    for row, event in events:
        # The raising reading counts as held; the clearing one does not.
        if event.state == "raised" and not state:
            state, at = True, row
        elif event.state == "cleared" and state:
            active[at:row] = True
            state = False
    if state:
        active[at:] = True
    raised = [row for row, event in events if event.state == "raised"]
    cleared = [row for row, event in events if event.state == "cleared"]
    out = Outcome()
    covered = np.zeros(n, dtype=bool)
    for fault in sensor.faults:
        covered[fault.start : min(n, fault.end + CLEAR_TARGET)] = True
        if fault.start < alarms_from or fault.end + CLEAR_TARGET > n:
            continue
        out.faults += 1
        inside = [r for r in raised if fault.start <= r < fault.end + CLEAR_TARGET]
        if len(inside) == 1 and not active[fault.start - 1]:
            out.one_alarm += 1
        if inside:
            out.raise_delays.append(inside[0] - fault.start + 1)
        out.held.append(float(active[fault.start : fault.end].mean()))
        after = [r for r in cleared if r >= fault.start]
        if after and not (inside and any(r > after[0] for r in inside)):
            out.clear_delays.append(after[0] - fault.end + 1)
        else:
            out.never_cleared += 1
    out.false_alarms = sum(1 for r in raised if not covered[r])
    normal = ~covered
    normal[:alarms_from] = False
    out.normal_readings = int(normal.sum())
    return out


def merge(outcomes: list[Outcome]) -> Outcome:
    total = Outcome()
    for o in outcomes:
        total.faults += o.faults
        total.one_alarm += o.one_alarm
        total.raise_delays += o.raise_delays
        total.held += o.held
        total.clear_delays += o.clear_delays
        total.never_cleared += o.never_cleared
        total.false_alarms += o.false_alarms
        total.normal_readings += o.normal_readings
    return total


def report(results: Results, item: str, o: Outcome) -> None:
    results.row(
        item, "faults that raised exactly one alarm", 100 * o.one_alarm / max(o.faults, 1),
        f"% of {o.faults}", target="100 %", met=o.one_alarm == o.faults,
    )  # fmt: skip
    raised = o.raise_delays
    for q in (50, 95):
        results.row(
            item, f"raise delay p{q}", percentile([float(x) for x in raised], q), "readings"
        )
    results.row(
        item, "raise delay max", float(max(raised, default=math.nan)), "readings",
        target=f"<= {RAISE_TARGET}",
        met=len(raised) == o.faults and max(raised, default=math.inf) <= RAISE_TARGET,
    )  # fmt: skip
    held = o.held
    results.row(item, "held fraction of the fault, mean", 100 * float(np.mean(held)), "%")
    results.row(
        item, "held fraction of the fault, min", 100 * min(held, default=math.nan), "%",
        target=f">= {HELD_TARGET:.0%}", met=min(held, default=0.0) >= HELD_TARGET,
    )  # fmt: skip
    cleared = [float(x) for x in o.clear_delays]
    for q in (50, 95):
        results.row(item, f"clear delay p{q}", percentile(cleared, q), "readings")
    results.row(
        item, "clear delay max", max(cleared, default=math.nan),
        f"readings ({o.never_cleared} not cleared)", target=f"<= {CLEAR_TARGET}",
        met=o.never_cleared == 0 and max(cleared, default=math.inf) <= CLEAR_TARGET,
    )  # fmt: skip
    rate = 1e4 * o.false_alarms / max(o.normal_readings, 1)
    results.row(
        item, "false alarm episodes per 10,000 normal readings", rate,
        f"({o.false_alarms} in {o.normal_readings:,} readings)", target=f"<= {FALSE_TARGET:g}",
        met=rate <= FALSE_TARGET,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The same sensors through the running service


def _key(alarm_id: str, state: str, ended_at: float | None, peak: float, reason: str | None) -> Any:
    return (alarm_id, state, None if ended_at is None else round(ended_at * 1000), peak, reason)


def model_keys(events: list[tuple[int, AlarmEvent]]) -> list[Any]:
    return [_key(e.alarm_id, e.state, e.ended_at, e.peak_score, e.reason) for _, e in events]


def frame_key(frame: dict[str, Any]) -> Any:
    ended = frame["ended_at"]
    ended_ts = None if ended is None else datetime.fromisoformat(ended).timestamp()
    return _key(
        frame["alarm_id"], frame["state"], ended_ts, frame["peak_score"], frame.get("reason")
    )


async def through_service(sensors: list[Sensor], url: str, ws_url: str) -> dict[str, list[Any]]:
    """Post every reading in ``CHUNK``-reading requests (the sensors' chunks in turn); the alarm
    frames received for each sensor, once every prediction has arrived."""
    total = sum(len(s.ts) for s in sensors)
    frames: dict[str, list[Any]] = {s.sensor_id: [] for s in sensors}
    got = 0
    async with (
        httpx.AsyncClient(base_url=url, timeout=60) as client,
        websockets.connect(f"{ws_url}?sensor=alarms-*&batch=true", max_size=None) as ws,
    ):
        await ws.recv()

        async def receive() -> None:
            nonlocal got
            while got < total:
                message = json.loads(await asyncio.wait_for(ws.recv(), 120))
                items = message["items"] if message["type"] == "predictions" else [message]
                for m in items:
                    if m["type"] == "prediction":
                        got += 1
                    elif m["type"] == "alarm" and m["state"] != "acknowledged":
                        frames[m["sensor_id"]].append(frame_key(m))

        receiver = asyncio.create_task(receive())
        longest = max(len(s.ts) for s in sensors)
        for first in range(0, longest, CHUNK):
            for s in sensors:
                body = s.sim.readings(
                    s.ts[first : first + CHUNK], s.values[first : first + CHUNK], first
                )
                if not body:
                    continue
                for _ in range(600):
                    r = await client.post("/v1/readings", json=body)
                    if r.status_code != 503:
                        break
                    await asyncio.sleep(0.1)
                if r.status_code != 202:
                    raise RuntimeError(f"POST refused: {r.status_code} {r.text[:200]}")
        await receiver
        # An alarm frame of the last batch may follow its predictions.
        try:
            while True:
                message = json.loads(await asyncio.wait_for(ws.recv(), 1.0))
                if message["type"] == "alarm" and message["state"] != "acknowledged":
                    frames[message["sensor_id"]].append(frame_key(message))
        except TimeoutError:
            pass
    return frames


def main() -> None:
    args = parse_args(__doc__ or "")
    results = Results("alarms")
    seeds = range(3) if args.quick else range(8)
    readings = 8_000 if args.quick else 16_000
    via_service = 1 if args.quick else 2
    settings = Settings()
    alarms_from = 2 * max(settings.model_warmup_readings, 32)
    outcomes: dict[tuple[int, str], list[Outcome]] = {}
    service_sensors: list[Sensor] = []
    in_process: dict[str, list[tuple[int, AlarmEvent]]] = {}
    started = time.perf_counter()
    for channels in (1, 4):
        for seed in seeds:
            sensor = make_sensor(channels, seed, readings)
            events = run_model(sensor, settings)
            in_process[sensor.sensor_id] = events
            key = (channels, sensor.sim.profile)
            outcomes.setdefault(key, []).append(score(sensor, events, alarms_from))
            if seed < via_service:
                service_sensors.append(sensor)
    results.note(
        f"{2 * len(seeds)} sensors at 1 Hz, {readings:,} readings each, fed in ts order to "
        f"RidgeForecaster in process in {time.perf_counter() - started:.1f} s"
    )
    for (channels, profile), outs in sorted(outcomes.items()):
        report(results, f"{channels}ch {profile}", merge(outs))
    report(results, "all", merge([o for outs in outcomes.values() for o in outs]))

    with service() as server:
        frames = asyncio.run(through_service(service_sensors, server.url, server.ws_url))
    agree = 0
    for sensor in service_sensors:
        want = model_keys(in_process[sensor.sensor_id])
        if frames[sensor.sensor_id] == want:
            agree += 1
        else:
            results.note(
                f"{sensor.sensor_id}: service {frames[sensor.sensor_id]} != in process {want}"
            )
    results.row(
        "service", "sensors whose alarm frames equal the in-process events", agree,
        f"of {len(service_sensors)} ({sum(len(f) for f in frames.values())} frames)",
        target="all", met=agree == len(service_sensors),
    )  # fmt: skip
    results.write(args.json)


if __name__ == "__main__":
    main()
