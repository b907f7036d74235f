"""``sensorcast bench``: the runner end to end on its cheapest item."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


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
    assert "| scaling | model stage, 1 worker |" in out.stdout
    report = json.loads((tmp_path / "latest.json").read_text())
    assert report["quick"] is True
    assert report["machine"]["cores"] >= 1
    scaling = report["scripts"]["scaling"]
    assert scaling["status"] == "ok"
    rates = [row["value"] for row in scaling["rows"]]
    assert rates and all(isinstance(r, float) and r > 0 for r in rates)
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
