"""The model stage through a real server: warm-up, retraining, hot swap, persistence, plug-ins."""

from __future__ import annotations

import asyncio
import csv
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import ROOT, Server, collect, connect, free_port, post, receive_json

FAST = {"workers": "1", "model_warmup_readings": "32"}


def readings(sensor: str, values: np.ndarray, first: int = 0, t0: float = 1.78e9) -> list[Any]:
    return [
        {
            "sensor_id": sensor,
            "ts": t0 + 60.0 * (first + i),
            "value": float(v),
            "id": str(first + i),
        }
        for i, v in enumerate(values)
    ]


def noise(n: int, seed: int = 0) -> np.ndarray:
    return 10.0 + np.random.default_rng(seed).normal(0, 1, n)


async def stream(
    srv: Server, sensor: str, values: np.ndarray, chunk: int = 50, first: int = 0
) -> list[dict[str, Any]]:
    """Post values in chunks and return every frame (predictions and model frames) for them."""
    async with (
        connect(f"{srv.ws_url}?sensor={sensor}") as ws,
        httpx.AsyncClient(base_url=srv.url, timeout=30) as client,
    ):
        await receive_json(ws)
        for i in range(0, len(values), chunk):
            r = await post(client, readings(sensor, values[i : i + chunk], first + i))
            assert r.status_code == 202, r.text
            # Give the trainer a moment, as a live sensor's pace would.
            await asyncio.sleep(0.05)
        frames: list[dict[str, Any]] = []
        while sum(f["type"] == "prediction" for f in frames) < len(values):
            frames += await collect(ws, 1, kinds=("prediction", "model"))
    return frames


async def test_warm_up_then_ok_with_a_model_frame(server_factory: Callable[..., Server]) -> None:
    """Predictions are warming_up until the first fit is swapped in, then ok with version 1."""
    srv = server_factory(**FAST)
    sensor = f"w-{uuid.uuid4().hex[:6]}"
    frames = await stream(srv, sensor, noise(120), chunk=10)
    preds = [f for f in frames if f["type"] == "prediction"]
    models = [f for f in frames if f["type"] == "model"]
    assert preds[0]["status"] == "warming_up" and preds[0]["forecast"] is None
    assert models and models[0]["model_version"] == 1
    first_ok = next(i for i, p in enumerate(preds) if p["status"] == "ok")
    assert first_ok >= 32
    assert all(p["status"] == "warming_up" for p in preds[:first_ok])
    ok = preds[-1]
    assert ok["status"] == "ok" and ok["model_version"] >= 1
    assert set(ok["forecast"]) == {"value"} and abs(ok["forecast"]["value"] - 10) < 2
    assert 0 <= ok["anomaly_score"] <= 1 and isinstance(ok["is_anomaly"], bool)


async def test_hot_swaps_lose_and_duplicate_nothing(server_factory: Callable[..., Server]) -> None:
    """Across several retrains every reading yields one prediction, in order, versions rising."""
    srv = server_factory(**FAST, retrain_every_readings="100")
    sensor = f"h-{uuid.uuid4().hex[:6]}"
    frames = await stream(srv, sensor, noise(700, seed=1), chunk=25)
    preds = [f for f in frames if f["type"] == "prediction"]
    models = [f for f in frames if f["type"] == "model"]
    assert [p["id"] for p in preds] == [str(i) for i in range(700)]
    versions = [p["model_version"] for p in preds]
    assert versions == sorted(versions)
    assert [m["model_version"] for m in models] == list(range(1, len(models) + 1))
    # 32, 64, 128, 256 while the window fills, then every 100: at least 5 swaps by 700.
    assert len(models) >= 5
    # Every model frame comes before the first prediction made with that version.
    order = {(f["type"], f.get("model_version"), f.get("id")): f["seq"] for f in frames}
    for m in models:
        firsts = [p["seq"] for p in preds if p["model_version"] == m["model_version"]]
        if firsts:
            assert order[("model", m["model_version"], None)] < min(firsts)


async def test_drift_triggers_an_early_retrain(server_factory: Callable[..., Server]) -> None:
    """With a large retrain_every_readings, a drift in the residuals still brings a new model."""
    srv = server_factory(**FAST, retrain_every_readings="100000")
    sensor = f"d-{uuid.uuid4().hex[:6]}"
    steady = noise(200, seed=2)
    frames = await stream(srv, sensor, steady, chunk=20)
    before = max(f["model_version"] for f in frames if f["type"] == "model")
    ramp = noise(200, seed=3) + np.linspace(0, 40, 200)
    frames = await stream(srv, sensor, ramp, chunk=20, first=200)
    after = [f["model_version"] for f in frames if f["type"] == "model"]
    assert after and max(after) > before


async def test_restart_with_a_model_dir_keeps_versions(
    server_factory: Callable[..., Server], tmp_path: Path
) -> None:
    """After a restart with the same model dir, the first prediction is ok at the same version."""
    model_dir = tmp_path / "models"
    sensor = f"p-{uuid.uuid4().hex[:6]}"
    srv = server_factory(**{**FAST, "workers": "2"}, model_dir=str(model_dir))
    frames = await stream(srv, sensor, noise(150, seed=4), chunk=15)
    version = frames[-1]["model_version"] if frames[-1]["type"] == "prediction" else None
    assert version is not None and version >= 2
    assert srv.stop() == 0
    assert (model_dir / f"{sensor}.model").exists()

    again = server_factory(**{**FAST, "workers": "3"}, model_dir=str(model_dir))
    frames = await stream(again, sensor, noise(5, seed=5), chunk=5, first=150)
    preds = [f for f in frames if f["type"] == "prediction"]
    assert [p["status"] for p in preds] == ["ok"] * 5
    assert {p["model_version"] for p in preds} == {version}


async def test_a_plug_in_model_works_end_to_end(server_factory: Callable[..., Server]) -> None:
    """SENSORCAST_MODEL loads a plug-in; its error on one reading marks that reading alone."""
    srv = server_factory(**FAST, model="tests.plugin_model:LastValue")
    sensor = f"x-{uuid.uuid4().hex[:6]}"
    values = noise(80, seed=6)
    values[70] = 13.0
    frames = await stream(srv, sensor, values, chunk=10)
    preds = [f for f in frames if f["type"] == "prediction"]
    assert len(preds) == 80
    bad = preds[70]
    assert bad["status"] == "error" and "unlucky value" in bad["reason"]
    assert bad["forecast"] is None and bad["values"] == {"value": 13.0}
    others = preds[60:70] + preds[71:]
    assert all(p["status"] == "ok" for p in others)
    # The plug-in forecasts the last value.
    assert all(p["forecast"] == p["values"] for p in others)
    assert any(f["type"] == "model" for f in frames)


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        ("SENSORCAST_MODEL", "no_such_module:Model", "no_such_module"),
        ("SENSORCAST_MODEL", "app.models.ridge:Linear", "missing"),
        ("SENSORCAST_MODEL_DIR", "/dev/null/models", "cannot create"),
    ],
)
def test_a_bad_model_setting_stops_start_up_with_one_line(
    name: str, value: str, needle: str
) -> None:
    """An unusable model class or model dir exits non-zero with one line naming the setting."""
    env = {**os.environ, name: value, "SENSORCAST_PORT": str(free_port())}
    done = subprocess.run(
        [sys.executable, "-m", "app", "serve"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{name}:" in lines[0] and needle in lines[0]


async def test_simulate_posts_labelled_readings(
    server_factory: Callable[..., Server], tmp_path: Path
) -> None:
    """sensorcast simulate posts to the URL, prints a summary and writes a labelled CSV."""
    srv = server_factory(workers="1")
    out = tmp_path / "sim.csv"
    done = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable, "-m", "app", "simulate", "--url", srv.url, "--sensors", "4",
            "--rate", "2000", "--duration", "2", "--batch", "40", "--anomaly-rate", "0.02",
            "--seed", "3", "--csv", str(out),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "sent" in done.stderr  # the live progress line
    assert "accepted" in done.stdout and "anomalies injected" in done.stdout
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) > 1000
    assert {r["sensor_id"] for r in rows} == {f"sim-{i}" for i in range(4)}
    assert {r["anomaly"] for r in rows} > {""}
    async with httpx.AsyncClient(base_url=srv.url) as client:
        for _ in range(50):
            sensors = (await client.get("/v1/sensors")).json()["sensors"]
            counts = {s["sensor_id"]: s for s in sensors}
            if len(counts) == 4:
                break
            await asyncio.sleep(0.2)
    assert set(counts) == {f"sim-{i}" for i in range(4)}


async def test_simulate_reruns_are_new_readings_unless_told(
    server_factory: Callable[..., Server],
) -> None:
    """A rerun with the same seed sends new ids (a run id in each); resending the same ids
    (--run-id) is all duplicates, and simulate then exits 1 with a line saying so."""
    srv = server_factory(workers="1")

    def simulate(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable, "-m", "app", "simulate", "--url", srv.url, "--sensors", "2",
                "--rate", "40", "--duration", "0.5", "--batch", "20", "--seed", "1",
                "--concurrency", "1", *extra,
            ],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    first = await asyncio.to_thread(simulate)
    again = await asyncio.to_thread(simulate)
    for done in (first, again):
        assert done.returncode == 0, done.stderr
        assert "duplicates 0," in done.stdout, done.stdout
    run = first.stdout.rpartition("reading ids: ")[2].partition("-N")[0]
    assert run and run in first.stdout and run not in again.stdout
    resent = await asyncio.to_thread(simulate, "--run-id", run)
    assert resent.returncode == 1
    # One request of 20 per run (20 readings at 40/s fill the 0.5 s): the same 20 ids.
    assert "sent 20 readings" in resent.stdout and "accepted 0, duplicates 20" in resent.stdout
    [line] = [x for x in resent.stderr.splitlines() if x.startswith("error:")]
    assert "none of the" in line and "duplicates" in line and "--run-id" in line
