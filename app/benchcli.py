"""``sensorcast bench``: run the scripts in ``bench/``, print one table, write JSON and a plot.

Each script runs as its own subprocess (``python -m bench.NAME [--quick] --json PATH``) with
a bounded time, so a hung or crashed script costs its own row only; the convention a script
follows is described in ``bench/_common.py``. Scripts not present in this checkout are
reported as skipped. The runner needs the source tree (``bench/`` beside ``app/``), which an
editable install from a clone has.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


@dataclass(frozen=True)
class Script:
    name: str
    """Module ``bench.NAME``."""
    title: str
    timeout_s: float
    quick_timeout_s: float


SCRIPTS = (
    Script("loop_lag", "1. responsiveness while retraining", 180, 60),
    Script("scaling", "2. model-stage scaling over model processes", 120, 60),
    Script("ingest", "3. ingest against no-op endpoints", 240, 60),
    Script("saturation", "4. end to end at saturation, /healthz, loop lag, memory", 420, 180),
    Script("e2e", "latency, POST to frame, at fixed rates", 150, 60),
    Script("fanout", "5. fan-out against websockets broadcast()", 180, 60),
    Script("hotpath", "service-process cost per reading, step by step", 60, 40),
    Script("model_stage", "model stage alone, CPU per reading", 240, 120),
    Script("model_quality", "model quality", 180, 60),
    Script("nab", "quality on real series (nab-dev), bulk and paced", 420, 60),
    Script("alarms", "alarm coverage on sustained faults", 240, 60),
    Script("scaleout", "scale-out on Redis beside memory://, and min_replicas=1", 300, 120),
    Script("redis_cost", "Redis cost per reading, sizing projections", 300, 120),
    Script(
        "hardening", "sensors, silent WebSockets and stalled bodies at default settings", 420, 180
    ),
)


def _run_script(script: Script, quick: bool, out_dir: Path) -> dict[str, Any]:
    """Run one script; return its JSON figures with ``status`` and ``seconds`` added."""
    path = BENCH / f"{script.name}.py"
    if not path.exists():
        return {"status": "skipped", "reason": "not in this checkout", "rows": []}
    json_path = out_dir / f"{script.name}.json"
    json_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", f"bench.{script.name}", "--json", str(json_path)]
    if quick:
        cmd.append("--quick")
    timeout_s = script.quick_timeout_s if quick else script.timeout_s
    log_path = out_dir / f"{script.name}.log"
    print(f"== {script.name}: {script.title} (at most {timeout_s:.0f} s)", flush=True)
    started = time.monotonic()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        deadline = started + timeout_s
        try:
            # Echo the script's lines as they come, within its time bound.
            import selectors

            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                while (remaining := deadline - time.monotonic()) > 0:
                    if not sel.select(min(remaining, 1.0)):
                        if proc.poll() is not None:
                            break
                        continue
                    line = proc.stdout.readline()
                    if not line:
                        break
                    log.write(line)
                    print("   " + line, end="", flush=True)
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
            return {"status": "timeout", "reason": f"over {timeout_s:.0f} s", "rows": []}
    seconds = time.monotonic() - started
    if proc.returncode != 0 or not json_path.exists():
        reason = f"exit code {proc.returncode}" + ("" if json_path.exists() else ", no JSON")
        return {"status": "failed", "reason": f"{reason}; see {log_path}", "rows": []}
    data = json.loads(json_path.read_text())
    if not isinstance(data, dict):
        return {"status": "failed", "reason": "its JSON is not {rows: [...]}", "rows": []}
    data.setdefault("rows", [])
    data["status"] = "ok"
    data["seconds"] = round(seconds, 1)
    return data


def fmt(value: Any) -> str:
    """A figure with three significant digits and k/M for large numbers; ``-`` for none.

    The benchmark scripts print their figures with it too, so the table and their output agree.

    Examples:
        >>> [fmt(x) for x in (0.01234, 3.456, 123.4, 12345.0, 2_500_000.0, None, "ok")]
        ['0.0123', '3.46', '123', '12.3k', '2.50M', '-', 'ok']
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if not isinstance(value, int | float):
        return str(value)
    if abs(value) >= 1e6:
        return f"{value / 1e6:.2f}M"
    if abs(value) >= 1e4:
        return f"{value / 1e3:.1f}k"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def table(scripts: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of every script's rows (and of the scripts that did not run)."""
    lines = [
        "| item | measure | value | unit | compared with | ratio | target |",
        "|---|---|---:|---|---|---:|---|",
    ]
    for name, data in scripts.items():
        if data["status"] != "ok":
            lines.append(f"| {name} | {data['status']}: {data.get('reason', '')} | | | | | |")
            continue
        for row in data["rows"]:
            base = ""
            if row.get("baseline"):
                base = f"{row['baseline']} ({fmt(row.get('baseline_value'))})"
            ratio = f"{fmt(row['ratio'])}x" if row.get("ratio") is not None else ""
            target = ""
            if row.get("target"):
                target = f"{row['target']}: {'met' if row.get('met') else '**missed**'}"
            lines.append(
                f"| {row.get('item', name)} | {row['measure']} | {fmt(row['value'])} "
                f"| {row.get('unit', '')} | {base} | {ratio} | {target} |"
            )
    return "\n".join(lines)


def plot(scripts: dict[str, dict[str, Any]], path: Path) -> bool:
    """One PNG with a panel per series the scripts gave; False when there is none."""
    series = [s for data in scripts.values() for s in data.get("series", {}).values()]
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(5.2 * len(series), 4.2), squeeze=False)
    for ax, s in zip(axes[0], series, strict=True):
        labels = s.get("labels", [s.get("ylabel", "")])
        if s.get("kind") == "bar":
            xs = range(len(s["x"]))
            width = 0.38 if "y2" in s else 0.7
            ax.bar([x - width / 2 if "y2" in s else x for x in xs], s["y"], width, label=labels[0])
            if "y2" in s:
                ax.bar([x + width / 2 for x in xs], s["y2"], width, label=labels[1])
            ax.set_xticks(list(xs), [str(x) for x in s["x"]])
        else:
            ax.plot(s["x"], s["y"], marker="o", label=labels[0])
            if "y2" in s:
                ax.plot(s["x"], s["y2"], marker="s", label=labels[1])
            if "ideal" in s:
                ax.plot(s["x"], s["ideal"], linestyle="--", color="grey", label="linear")
            ax.set_xticks(s["x"])
        if s.get("log"):
            ax.set_yscale("log")
        ax.set_xlabel(s.get("xlabel", ""))
        ax.set_ylabel(s.get("ylabel", ""))
        ax.set_title(s.get("title", ""))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def machine() -> dict[str, Any]:
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    import shutil

    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
        "load_generator": "wrk" if shutil.which("wrk") else "httpx (wrk not installed)",
    }


def run(quick: bool, only: list[str], out_dir: Path | None) -> int:
    """Run the selected scripts; returns 0 when every script that ran succeeded."""
    if not BENCH.is_dir():
        print(f"sensorcast bench: no bench/ beside {ROOT / 'app'}; run it from a clone")
        return 2
    out_dir = out_dir or BENCH / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    known = {s.name for s in SCRIPTS}
    unknown = [name for name in only if name not in known]
    if unknown:
        print(f"sensorcast bench: unknown item {', '.join(unknown)}; known: {', '.join(known)}")
        return 2
    selected = [s for s in SCRIPTS if not only or s.name in only]
    info = machine()
    if not info["load_generator"].startswith("wrk"):
        print("note: wrk is not installed; HTTP load uses an httpx client (much slower)")
    started = datetime.now(UTC)
    scripts: dict[str, dict[str, Any]] = {}
    for script in selected:
        load_before = os.getloadavg()[0]
        scripts[script.name] = _run_script(script, quick, out_dir)
        # The 1-minute load average says how much else ran on the machine meanwhile.
        scripts[script.name]["load_average"] = [load_before, os.getloadavg()[0]]
    text = table(scripts)
    print()
    print(text)
    report = {
        "started_at": started.isoformat(),
        "quick": quick,
        "machine": info,
        "scripts": scripts,
    }
    json_path = out_dir / "latest.json"
    json_path.write_text(json.dumps(report, indent=1))
    png_path = out_dir / "latest.png"
    plotted = plot(scripts, png_path)
    print(f"\nmachine: {info['cores']} cores, {info['cpu']}, Python {info['python']}")
    for name, data in scripts.items():
        if data["status"] == "ok":
            before, after = data["load_average"]
            print(f"{name}: {data['seconds']} s, load average {before:.1f} -> {after:.1f}")
    print(f"wrote {json_path}" + (f" and {png_path}" if plotted else " (nothing to plot)"))
    failed = [n for n, d in scripts.items() if d["status"] in {"failed", "timeout"}]
    return 1 if failed else 0
