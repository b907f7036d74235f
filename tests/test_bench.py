"""``sensorcast bench``: the runner end to end on its cheapest item; the README's figures."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest

from bench import readme
from bench._workload import CYCLE, Stream, sensor_ids
from bench.heavy import Model as HeavyModel
from tests.conftest import ROOT, Server


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_quick_scaling_run_writes_table_json_and_png(tmp_path: Path) -> None:
    """`bench --quick --only scaling` prints a table and writes JSON figures and a PNG."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "app",
            "bench",
            "--quick",
            "--only",
            "scaling",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=75,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "| scaling | model stage, 1 process |" in out.stdout
    report = json.loads((tmp_path / "latest.json").read_text())
    assert report["quick"] is True
    assert report["machine"]["cores"] >= 1
    scaling = report["scripts"]["scaling"]
    assert scaling["status"] == "ok"
    rates = [row["value"] for row in scaling["rows"]]
    assert len(rates) == report["machine"]["cores"]
    assert all(isinstance(r, float) and r > 0 for r in rates)
    assert set(report["scripts"]) == {"scaling"}
    png = (tmp_path / "latest.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_unknown_item_is_refused(tmp_path: Path) -> None:
    """An unknown --only item stops with exit code 2 and names the known ones."""
    out = subprocess.run(
        [sys.executable, "-m", "app", "bench", "--only", "nope", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "unknown item nope" in out.stdout and "scaling" in out.stdout
    assert not (tmp_path / "latest.json").exists()


def test_readme_figures_are_what_the_committed_json_gives() -> None:
    """The README's "Latest figures" section is exactly what bench.readme makes of latest.json."""
    report = json.loads((ROOT / "bench" / "results" / "latest.json").read_text())
    text = (ROOT / "README.md").read_text()
    assert readme.replace(text, readme.render(report)) == text
    section = text[text.index(readme.BEGIN) : text.index(readme.END)]
    for data in report["scripts"].values():
        for row in data["rows"]:
            assert f"| {row['measure']} |" in section


def _report() -> dict[str, object]:
    return {
        "started_at": "2026-12-01T07:00:00+00:00",
        "quick": False,
        "machine": {"cores": 2, "cpu": "cpu", "python": "3.11", "system": "Linux",
                    "load_generator": "wrk"},
        "scripts": {"scaling": {"status": "ok", "rows": [
            {"item": "scaling", "measure": "model stage, 1 process", "value": 12345.0,
             "unit": "readings/s"}], "notes": ["a note"], "load_average": [0.5, 1.0]}},
    }  # fmt: skip


def test_readme_command_rewrites_only_its_section_and_is_idempotent(tmp_path: Path) -> None:
    """bench.readme replaces the marked section from the JSON, then --check passes unchanged."""
    json_path = tmp_path / "latest.json"
    json_path.write_text(json.dumps(_report()))
    page = tmp_path / "README.md"
    page.write_text(f"# t\n\nbefore\n{readme.BEGIN}\n| stale | row |\n{readme.END}\nafter\n")
    args = ["--json", str(json_path), "--readme", str(page)]
    assert readme.main([*args, "--check"]) == 1
    assert readme.main(args) == 0
    text = page.read_text()
    assert "stale" not in text and text.startswith("# t\n\nbefore\n") and text.endswith("after\n")
    assert "| scaling | model stage, 1 process | 12.3k | readings/s |" in text
    assert "- scaling: a note" in text
    assert readme.main([*args, "--check"]) == 0
    assert readme.main(args) == 0 and page.read_text() == text


def test_readme_sizing_section_comes_from_the_redis_cost_rows(tmp_path: Path) -> None:
    """The sizing section between its own markers is written from the ``redis_cost`` rows
    (and says so when the run had none); the README's is what the committed JSON gives."""
    report = _report()
    rows = [
        {"item": "redis 1,000-reading requests", "measure": "Redis CPU per reading",
         "value": 6.5, "unit": "us/reading"},
        {"item": "projected", "measure": "model processes for 100,000 readings/s",
         "value": 4.25, "unit": "processes"},
    ]  # fmt: skip
    assert "did not include `redis_cost`" in readme.render_sizing(report)
    report["scripts"]["redis_cost"] = {"status": "ok", "rows": rows}  # type: ignore[index]
    sizing = readme.render_sizing(report)
    assert "| Redis CPU per reading | 6.5 µs | n/a |" in sizing
    assert "- projected, model processes for 100,000 readings/s: 4.25" in sizing
    committed = json.loads((ROOT / "bench" / "results" / "latest.json").read_text())
    text = (ROOT / "README.md").read_text()
    expected = readme.render_sizing(committed)
    assert readme.replace(text, expected, readme.SIZING_BEGIN, readme.SIZING_END) == text


def test_readme_command_refuses_a_page_without_markers(tmp_path: Path) -> None:
    """A README without the marker comments is left alone and the command exits 2."""
    page = tmp_path / "README.md"
    page.write_text("# no markers\n")
    json_path = tmp_path / "latest.json"
    json_path.write_text(json.dumps(_report()))
    assert readme.main(["--json", str(json_path), "--readme", str(page)]) == 2
    assert page.read_text() == "# no markers\n"


NAB_SERIES = (
    "realKnownCause/rogue_agent_key_hold.csv",
    "realAdExchange/exchange-3_cpc_results.csv",
)


def test_nab_scoring_rules() -> None:
    """The real-data benchmark scores windows, false-alarm events and alarms as its data says."""
    import doctest

    from bench import nab

    assert doctest.testmod(nab).failed == 0
    ts = np.arange(0.0, 10 * 3600, 300)  # every 5 minutes for 10 hours
    flag = np.zeros(len(ts), dtype=bool)
    flag[[0, 11, 24]] = True  # 0 h, 55 min (same event), 2 h (a new one)
    flag[60] = True  # 5 h, inside the window below
    windows = [(4.5 * 3600, 5.5 * 3600), (8 * 3600, 9 * 3600)]
    assert nab.false_events(ts, flag, windows) == 2
    assert nab.windows_found(ts, flag, windows) == 1
    alarms: list[tuple[float, float | None]] = [(3 * 3600, 4.6 * 3600), (7 * 3600, None)]
    assert nab.alarm_windows_found(alarms, windows) == 2
    assert nab.false_alarms(alarms, windows) == 2


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_quick_nab_run_scores_every_reading(tmp_path: Path) -> None:
    """`bench.nab --quick` on two real series posts them in bulk and paced and scores both."""
    from bench import nab

    if not (nab.DATA / "windows.json").exists():
        pytest.skip(f"the nab-dev data set is not at {nab.DATA}")
    out_path = tmp_path / "nab.json"
    out = subprocess.run(
        [sys.executable, "-m", "bench.nab", "--quick", "--max-readings", "800",
         "--series", *NAB_SERIES, "--json", str(out_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads(out_path.read_text())
    modes = data["details"]["modes"]
    assert set(modes) == {"bulk", "paced"}
    series = nab.load(nab.DATA, NAB_SERIES, 800)
    for mode in modes.values():
        scores = {s["series"]: s for s in mode["series"]}
        assert set(scores) == set(NAB_SERIES)
        for s in series:
            got = scores[s.name]
            assert got["readings"] == 800
            assert got["windows"] == len(s.windows)
            assert 0 <= got["found"] <= got["windows"]
    paced = modes["paced"]["overall"]
    assert paced["ok_fraction"] > 0.5  # the model fitted and scored most readings
    assert 0 < paced["mae_ratio_mean"] < 5
    measures = {(r["item"], r["measure"]) for r in data["rows"]}
    assert ("paced", "windows found (flags)") in measures
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{nab.README_BEGIN}\nold\n{nab.README_END}\nafter\n")
    nab.write_readme(out_path, readme)
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    assert f"| paced | {paced['found_fraction']:.0%} ({paced['found']}/" in text


def test_readme_nab_figures_are_what_the_committed_json_gives() -> None:
    """The README's real-data figures are exactly what bench.nab makes of results/nab.json."""
    from bench import nab

    data = json.loads((ROOT / "bench" / "results" / "nab.json").read_text())
    text = (ROOT / "README.md").read_text()
    assert nab.readme_text(text, data) == text
    assert data["details"]["modes"]["bulk"]["overall"]["series"] == 50


def test_the_heavy_model_trains_a_forest_at_every_refit() -> None:
    """The loop-lag benchmark's model does its heavy work where the model refits: a fit path
    the service no longer calls would leave every executor with the cheap refit alone."""
    model = HeavyModel("heavy-0", ("value",))
    values = np.random.default_rng(3).normal(20.0, 1.0, (450, 1))
    model.observe(np.arange(450.0), values)
    # Fits at 16 readings, then every 200: at 16, 216 and 416.
    assert model.version == 3
    assert model.forests == model.version


@pytest.mark.parametrize("channels", [1, 3])
def test_a_stream_body_is_its_readings_encoded(channels: int) -> None:
    """The load generators' bodies, put together from pieces encoded once, are the bytes
    msgspec gives for the same readings' objects: the same readings, in order, across rounds
    of the sensors and across the end of each sensor's cycle of values."""
    stream = Stream(sensor_ids(37, prefix="t"), channels=channels)
    twin = copy.deepcopy(stream)
    for _ in range((CYCLE + 2) * 37 // 997 + 1):
        items: list[dict[str, Any]] = []
        for r in twin.take(997):
            values = dict(zip(r.channels, r.values, strict=True))
            item: dict[str, Any] = {"sensor_id": r.sensor_id, "ts": r.ts}
            if channels == 1:
                item["value"] = r.values[0]
            else:
                item["values"] = values
            items.append(item)
        assert stream.body(997) == msgspec.json.encode(items)
    assert stream.per_sensor > CYCLE


@pytest.mark.timeout(90)
def test_the_load_generator_honours_retry_after_and_loses_nothing(
    server_factory: Callable[..., Server],
) -> None:
    """``bench/_loadgen.py`` against a real service whose queue is full most of the time (a
    long batch window holds what is queued): it is refused with 503, waits the Retry-After
    given, sends the same body again, and reports exactly the readings the service counted
    as accepted, no more (nothing sent twice) and no fewer."""
    srv = server_factory(
        queue_max_readings="500", workers="1", batch_window_ms="1500", admission_wait_ms="0"
    )
    now = time.time()
    window = [str(now), str(now + 4), str(now + 4)]
    out = subprocess.run(
        [
            sys.executable, "-m", "bench._loadgen", srv.url, "--connections", "2",
            "--sensors", "7", "--batch", "300",
            "--start", window[0], "--end", window[1], "--stop", window[2],
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.split("RESULT ", 1)[1])
    assert result["failed"] == 0, result
    assert result["refused"] >= 1 and result["waited_s"] == result["refused"] * 1.0, result
    assert result["accepted_total"] >= 600, result
    metrics = httpx.get(srv.url + "/metrics", timeout=10).text
    counted = re.search(r"^sensorcast_readings_accepted_total (\S+)$", metrics, re.M)
    assert counted is not None
    assert float(counted.group(1)) == result["accepted_total"]
