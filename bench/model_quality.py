"""Forecast and anomaly quality of the default model, through the live service.

Starts ``sensorcast serve`` on a free loopback port, posts simulator data (labelled
anomalies, see ``app/simulate.py``) round by round, collects every prediction over the
WebSocket, and prints a table:

- forecast MAE against the persistence forecast (the last value), on readings away from
  anomalies (not in an event nor within ``MEMORY`` readings after one);
- event-level recall per anomaly kind: an event counts as found when a reading inside it is
  flagged; only events that start after the sensor's warm-up count;
- precision: flagged readings are grouped into alarms (runs of consecutive flags); an alarm
  is right when it starts inside an event or within ``tolerance`` readings after its end.
  Shown with a tolerance of 10 readings and of ``MEMORY`` (48: the model's window, over which
  an event still shapes the forecasts).

The same table for River's ``HalfSpaceTrees`` (``pip install -e '.[quality]'``), fed the same
readings in the same order (with each channel's change from the last reading as extra
features), scored on the same post-warm-up readings; its threshold is the best of a grid by
F1 on this very data, an advantage our model does not get.

    .venv/bin/python bench/model_quality.py [--sensors 24] [--readings 2000] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import websockets

from app.simulate import KINDS, Event, SensorSim, make_sensors

ROOT = Path(__file__).resolve().parent.parent
MEMORY = 48


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Data:
    """The simulated readings of every sensor, with labels."""

    def __init__(self, sensors: list[SensorSim], readings: int) -> None:
        self.sensors = sensors
        self.ts: dict[str, np.ndarray] = {}
        self.values: dict[str, np.ndarray] = {}
        for sim in sensors:
            ts, values, _ = sim.take(readings)
            self.ts[sim.sensor_id], self.values[sim.sensor_id] = ts, values
        self.events: dict[str, list[Event]] = {
            s.sensor_id: [e for e in s.events if e.end <= readings] for s in sensors
        }
        self.n = readings

    def near_event(self, sensor_id: str, after: int) -> np.ndarray:
        """Readings inside an event or within ``after`` readings of its end."""
        mask = np.zeros(self.n, dtype=bool)
        for e in self.events[sensor_id]:
            mask[e.start : min(self.n, e.end + after)] = True
        return mask


def run_service(
    data: Data, rounds_of: int, workers: int, pause: float
) -> dict[str, dict[str, Any]]:
    """Post every reading through a live server; return per-sensor arrays of predictions."""
    port = free_port()
    env = {
        **os.environ,
        "SENSORCAST_HOST": "127.0.0.1",
        "SENSORCAST_PORT": str(port),
        "SENSORCAST_WORKERS": str(workers),
        "SENSORCAST_LOG_LEVEL": "warning",
    }
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", "serve"], cwd=ROOT, env=env, stdout=log, stderr=log
        )
        try:
            return asyncio.run(_drive(data, port, rounds_of, pause))
        finally:
            proc.terminate()
            proc.wait(60)


async def _drive(data: Data, port: int, rounds_of: int, pause: float) -> dict[str, dict[str, Any]]:
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for _ in range(600):
            try:
                if (await client.get("/readyz")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
        ws_url = f"ws://127.0.0.1:{port}/v1/ws/predictions"
        return await _stream(data, client, ws_url, rounds_of, pause)


async def _stream(
    data: Data, client: httpx.AsyncClient, ws_url: str, rounds_of: int, pause: float
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for sim in data.sensors:
        c = sim.channels
        out[sim.sensor_id] = {
            "status": np.array([""] * data.n, dtype=object),
            "forecast": np.full((data.n, c), np.nan),
            "flag": np.zeros(data.n, dtype=bool),
            "score": np.full(data.n, np.nan),
        }
    got = 0
    async with websockets.connect(f"{ws_url}?batch=true", max_size=None) as ws:
        await ws.recv()
        started = time.monotonic()
        for first in range(0, data.n, rounds_of):
            body = []
            for sim in data.sensors:
                sid = sim.sensor_id
                ts = data.ts[sid][first : first + rounds_of]
                values = data.values[sid][first : first + rounds_of]
                body += sim.readings(ts, values, first)
            r = await client.post("/v1/readings", json=body)
            assert r.status_code == 202, r.text
            want = got + len(body)
            while got < want:
                frame = json.loads(await ws.recv())
                items = frame["items"] if frame["type"] == "predictions" else [frame]
                for m in items:
                    if m["type"] != "prediction":
                        continue
                    got += 1
                    row, i = out[m["sensor_id"]], int(m["id"])
                    row["status"][i] = m["status"]
                    row["flag"][i] = m["is_anomaly"]
                    if m["status"] == "ok":
                        row["forecast"][i] = list(m["forecast"].values())
                        row["score"][i] = m["anomaly_score"]
            await asyncio.sleep(pause)
            if (first // rounds_of) % 20 == 0:
                print(f"\r  service: {got:,} predictions", end="", file=sys.stderr, flush=True)
        elapsed = time.monotonic() - started
    print(f"\r  service: {got:,} predictions in {elapsed:.1f} s", file=sys.stderr)
    return out


def forecast_ratio(
    data: Data, preds: dict[str, dict[str, Any]], profile: str, channels: int
) -> float:
    ours = persistence = 0.0
    for sim in data.sensors:
        if sim.profile != profile or sim.channels != channels:
            continue
        sid = sim.sensor_id
        values, p = data.values[sid], preds[sid]
        ok = (p["status"] == "ok")[:-1]
        clean = ~data.near_event(sid, MEMORY)
        use = ok & clean[:-1] & clean[1:]
        ours += float(np.abs(p["forecast"][:-1][use] - values[1:][use]).mean(axis=1).sum())
        persistence += float(np.abs(values[:-1][use] - values[1:][use]).mean(axis=1).sum())
    return ours / persistence if persistence else float("nan")


def detection(
    data: Data, flags: dict[str, np.ndarray], scored: dict[str, np.ndarray], tolerance: int
) -> tuple[dict[str, tuple[int, int]], float, int]:
    """Recall per kind as (found, events), precision of alarms, and the number of alarms."""
    recall: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    alarms = right = 0
    for sim in data.sensors:
        sid = sim.sensor_id
        flag = flags[sid] & scored[sid]
        for e in data.events[sid]:
            if not scored[sid][e.start]:
                continue
            recall[e.kind][1] += 1
            recall[e.kind][0] += int(flag[e.start : e.end].any())
        starts = np.flatnonzero(flag & ~np.concatenate([[False], flag[:-1]]))
        for s in starts:
            alarms += 1
            right += any(e.start <= s < e.end + tolerance for e in data.events[sid])
    return (
        {k: (v[0], v[1]) for k, v in recall.items()},
        right / alarms if alarms else float("nan"),
        alarms,
    )


def half_space_trees(
    data: Data, scored: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], float]:
    """River's HalfSpaceTrees on the same readings; flags at the best F1 threshold."""
    from river import anomaly, compose, preprocessing

    scores: dict[str, np.ndarray] = {}
    for sim in data.sensors:
        sid = sim.sensor_id
        model = compose.Pipeline(
            preprocessing.MinMaxScaler(),
            anomaly.HalfSpaceTrees(n_trees=10, height=8, window_size=250, seed=42),
        )
        values = data.values[sid]
        out = np.zeros(data.n)
        previous = values[0]
        for i in range(data.n):
            x = {name: float(v) for name, v in zip(sim.names, values[i], strict=True)}
            x.update(
                {
                    f"{n}_delta": float(v - p)
                    for n, v, p in zip(sim.names, values[i], previous, strict=True)
                }
            )
            previous = values[i]
            out[i] = model.score_one(x)
            model.learn_one(x)
        scores[sid] = out
    best: tuple[float, float] = (-1.0, 0.5)
    for threshold in np.arange(0.5, 1.0, 0.02):
        flags = {sid: s > threshold for sid, s in scores.items()}
        recall, precision, _ = detection(data, flags, scored, MEMORY)
        found = sum(v[0] for v in recall.values()) / max(1, sum(v[1] for v in recall.values()))
        f1 = 2 * precision * found / (precision + found) if precision + found > 0 else 0.0
        if f1 > best[0]:
            best = (f1, float(threshold))
    return {sid: s > best[1] for sid, s in scores.items()}, best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sensors", type=int, default=24, help="single-value sensors")
    parser.add_argument("--multi", type=int, default=6, help="4-channel sensors")
    parser.add_argument("--readings", type=int, default=2_000, help="per sensor")
    parser.add_argument("--anomaly-rate", type=float, default=0.004)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--round", type=int, default=10, help="readings per sensor per POST")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--pause", type=float, default=0.1,
        help="seconds between rounds, so that refits land about when they would at a real "
        "sensor's pace (readings minutes apart) rather than many rounds late",
    )  # fmt: skip
    parser.add_argument("--no-river", action="store_true")
    parser.add_argument("--json", type=Path, help="write the figures here (bench/_common.py)")
    parser.add_argument("--quick", action="store_true", help="fewer readings per sensor")
    args = parser.parse_args()
    if args.quick:
        args.readings = min(args.readings, 800)

    start = 1.78e9
    sensors = make_sensors(
        args.sensors, seed=args.seed, anomaly_rate=args.anomaly_rate, start_ts=start
    )
    sensors += make_sensors(
        args.multi, channels=4, seed=args.seed + 1, anomaly_rate=args.anomaly_rate,
        start_ts=start, prefix="multi",
    )  # fmt: skip
    data = Data(sensors, args.readings)
    events = sum(len(v) for v in data.events.values())
    print(
        f"{len(sensors)} sensors ({args.sensors} single-value, {args.multi} with 4 channels) × "
        f"{args.readings} readings, {events} labelled anomalies, seed {args.seed}",
        file=sys.stderr,
    )
    preds = run_service(data, args.round, args.workers, args.pause)
    scored = {sid: p["status"] == "ok" for sid, p in preds.items()}
    ours = {sid: p["flag"] for sid, p in preds.items()}

    rows: list[tuple[str, str, str]] = []
    for profile in ("seasonal", "wander"):
        rows.append((
            f"forecast MAE / persistence, {profile}, 1 channel",
            f"{forecast_ratio(data, preds, profile, 1):.2f}", "n/a",
        ))  # fmt: skip
    if args.multi:
        both = [forecast_ratio(data, preds, p, 4) for p in ("seasonal", "wander")]
        rows.append(("forecast MAE / persistence, 4 channels", f"{np.nanmean(both):.2f}", "n/a"))

    theirs: dict[str, np.ndarray] | None = None
    threshold = float("nan")
    if not args.no_river:
        try:
            started = time.monotonic()
            theirs, threshold = half_space_trees(data, scored)
            print(f"  HalfSpaceTrees: {time.monotonic() - started:.1f} s", file=sys.stderr)
        except ImportError:
            print("  river is not installed: pip install -e '.[quality]'", file=sys.stderr)

    def fmt_recall(r: dict[str, tuple[int, int]], kind: str) -> str:
        found, total = r.get(kind, (0, 0))
        return f"{found / total:.2f} ({found}/{total})" if total else "-"

    tables = {"ours": detection(data, ours, scored, MEMORY)}
    short = {"ours": detection(data, ours, scored, 10)}
    if theirs is not None:
        tables["hst"] = detection(data, theirs, scored, MEMORY)
        short["hst"] = detection(data, theirs, scored, 10)
    for kind in KINDS:
        rows.append((
            f"recall, {kind}",
            fmt_recall(tables["ours"][0], kind),
            fmt_recall(tables["hst"][0], kind) if "hst" in tables else "-",
        ))  # fmt: skip

    def overall(r: dict[str, tuple[int, int]]) -> float:
        return sum(v[0] for v in r.values()) / max(1, sum(v[1] for v in r.values()))

    def f1(t: tuple[dict[str, tuple[int, int]], float, int]) -> str:
        recall, precision = overall(t[0]), t[1]
        return f"{2 * recall * precision / (recall + precision):.2f}"

    rows.append((
        "recall, all events",
        f"{overall(tables['ours'][0]):.2f}",
        f"{overall(tables['hst'][0]):.2f}" if "hst" in tables else "-",
    ))  # fmt: skip
    for label, t in (
        (f"precision (alarm within {MEMORY} readings)", tables),
        ("precision (within 10)", short),
    ):
        rows.append((
            label,
            f"{t['ours'][1]:.2f} ({t['ours'][2]} alarms)",
            f"{t['hst'][1]:.2f} ({t['hst'][2]} alarms)" if "hst" in t else "-",
        ))  # fmt: skip

    rows.append((
        f"F1 (within {MEMORY})",
        f1(tables["ours"]),
        f1(tables["hst"]) if "hst" in tables else "-",
    ))  # fmt: skip

    hst_name = (
        f"HalfSpaceTrees (threshold {threshold:.2f})" if theirs is not None else "HalfSpaceTrees"
    )
    width = max(len(r[0]) for r in rows)
    print(f"| {'':<{width}} | {'sensorcast (RidgeForecaster)':<28} | {hst_name} |")
    print(f"|{'-' * (width + 2)}|{'-' * 30}|{'-' * (len(hst_name) + 2)}|")
    for name, a, b in rows:
        print(f"| {name:<{width}} | {a:<28} | {b} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": _json_rows(rows)}, indent=1))


def _json_rows(rows: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """The table in the bench/_common.py convention: ours, with HalfSpaceTrees as baseline."""
    out: list[dict[str, Any]] = []
    for name, ours, theirs in rows:
        try:
            value = float(ours.split()[0])
        except (ValueError, IndexError):
            continue
        row: dict[str, Any] = {"item": "quality", "measure": name, "value": value, "unit": ""}
        try:
            baseline = float(theirs.split()[0])
        except (ValueError, IndexError):
            baseline = None
        if baseline is not None:
            row.update(baseline="River HalfSpaceTrees", baseline_value=baseline,
                       ratio=value / baseline if baseline else None)  # fmt: skip
        out.append(row)
    return out


if __name__ == "__main__":
    main()
