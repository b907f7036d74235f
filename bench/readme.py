"""Write the README's "Latest figures" table from ``bench/results/latest.json``.

``python -m bench.readme`` replaces what lies between the two marker comments below in
``README.md`` with the table ``sensorcast bench`` printed (``app.benchcli.table``), headed by
when, where and how the figures were taken, and the sizing figures (the ``redis_cost`` rows)
between their own markers, so figures are never typed by hand.
``--check`` changes nothing and exits 1 when the README is not what the JSON gives.

Run: ``python -m bench.readme [--check] [--json PATH] [--readme PATH]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from app.benchcli import fmt, table

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- bench:latest:begin (python -m bench.readme writes this part) -->"
END = "<!-- bench:latest:end -->"
SIZING_BEGIN = "<!-- bench:sizing:begin (python -m bench.readme writes this part) -->"
SIZING_END = "<!-- bench:sizing:end -->"


def render(report: dict[str, Any]) -> str:
    """The Markdown between the markers, from a ``latest.json`` report."""
    m = report["machine"]
    run = "`sensorcast bench --quick`" if report.get("quick") else "`sensorcast bench`"
    scripts: dict[str, dict[str, Any]] = report["scripts"]
    loads = [
        f"{name} {d['load_average'][0]:.1f}-{d['load_average'][1]:.1f}"
        for name, d in scripts.items()
        if d.get("load_average")
    ]
    lines = [
        f"Run {run} started {report['started_at'][:16].replace('T', ' ')} UTC on "
        f"{m['cores']} cores ({m['cpu']}), Python {m['python']}, {m['system']}, "
        f"load generator {m['load_generator']}.",
    ]
    if loads:
        lines.append(f"1-minute load average before-after each script: {', '.join(loads)}.")
    if report.get("quick"):
        lines.append("**Quick run: short windows, for checking the scripts, not for reading.**")
    notes = [f"- {name}: {n}" for name, d in scripts.items() for n in d.get("notes", [])]
    return "\n".join([*lines, "", table(scripts), *([""] + notes if notes else [])])


def _value(rows: list[dict[str, Any]], item: str, measure: str) -> float | None:
    for row in rows:
        if row["item"] == item and row["measure"] == measure:
            value: float = row["value"]
            return value
    return None


def render_sizing(report: dict[str, Any]) -> str:
    """The sizing figures, from the ``redis_cost`` rows of a ``latest.json`` report."""
    rows: list[dict[str, Any]] = report["scripts"].get("redis_cost", {}).get("rows", [])
    bulk, single = "redis 1,000-reading requests", "redis single-reading requests"
    cpu = _value(rows, bulk, "Redis CPU per reading")
    if cpu is None:
        return (
            "_The latest run did not include `redis_cost`: `sensorcast bench --only redis_cost`._"
        )

    def get(item: str, measure: str, unit: str = "") -> str:
        value = _value(rows, item, measure)
        return "n/a" if value is None else f"{fmt(value)} {unit}".rstrip()

    lines = [
        "| per reading | 1,000-reading requests | single-reading requests |",
        "|---|---|---|",
    ]
    for measure, unit in (
        ("Redis CPU per reading", "µs"),
        ("Redis commands per reading", ""),
        ("bytes into Redis per reading", "B"),
        ("bytes out of Redis per reading", "B"),
        ("of which one API replica reading the stream (XREAD)", "µs"),
    ):
        lines.append(f"| {measure} | {get(bulk, measure, unit)} | {get(single, measure, unit)} |")
    lines.append("")
    for measure in (
        "readings/s one Redis primary carries (1 core, bulk requests)",
        "model stage, readings/s per model process",
        "model processes for 100,000 readings/s",
        "Redis primaries for 100,000 readings/s (partitioned)",
        "model processes for 1,000,000 readings/s",
        "Redis primaries for 1,000,000 readings/s (partitioned)",
    ):
        lines.append(f"- projected, {measure}: {get('projected', measure)}")
    return "\n".join(lines)


def replace(text: str, body: str, begin_marker: str = BEGIN, end_marker: str = END) -> str:
    """``text`` with what lies between the markers replaced by ``body``.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    begin, end = text.find(begin_marker), text.find(end_marker)
    if begin < 0 or end < begin:
        raise ValueError(f"README has no {begin_marker!r} ... {end_marker!r} section")
    return text[: begin + len(begin_marker)] + "\n" + body + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--check", action="store_true", help="only say whether it is current")
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    try:
        report = json.loads(args.json.read_text())
        new = replace(text, render(report))
        if SIZING_BEGIN in new:
            new = replace(new, render_sizing(report), SIZING_BEGIN, SIZING_END)
    except (OSError, ValueError, KeyError) as exc:
        print(f"bench.readme: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"{args.readme} does not match {args.json}: run python -m bench.readme")
            return 1
        return 0
    if new != text:
        args.readme.write_text(new)
        print(f"wrote the latest figures from {args.json} into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
