"""``sensorcast subscribe``: print predictions as JSON lines, reconnecting and resuming.

After any disconnect the client reconnects with ``since`` set to the last ``seq`` it printed
(or, before the first message, the ``seq`` of the server's hello) and the ``epoch`` it came
from, so it prints every kept message exactly once; what the server no longer keeps, or a
restart, shows up as a ``gap`` line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any, TextIO
from urllib.parse import urlencode, urlsplit, urlunsplit

import websockets

REFUSED = {400, 401, 403, 404}


def build_url(
    base: str, args: argparse.Namespace, since: int | None, epoch: str | None = None
) -> str:
    """The WebSocket URL with the query for the filters and the resume point.

    Examples:
        >>> ns = argparse.Namespace(sensor=["pump-*"], anomalies_only=True, batch=False, key=None)
        >>> build_url("ws://h:1/v1/ws/predictions", ns, 7, "e1")
        'ws://h:1/v1/ws/predictions?sensor=pump-%2A&anomalies_only=true&since=7&epoch=e1'
    """
    query: list[tuple[str, str]] = [("sensor", s) for s in args.sensor]
    if args.anomalies_only:
        query.append(("anomalies_only", "true"))
    if getattr(args, "batch", False):
        query.append(("batch", "true"))
    if since is not None:
        query.append(("since", str(since)))
        if epoch is not None:
            query.append(("epoch", epoch))
    if getattr(args, "key", None):
        query.append(("key", args.key))
    parts = urlsplit(base)
    joined = "&".join(q for q in (parts.query, urlencode(query)) if q)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, joined, ""))


_RED, _DIM, _BOLD, _RESET = "\033[31m", "\033[2m", "\033[1m", "\033[0m"


def _numbers(values: dict[str, Any] | None) -> str:
    if not values:
        return "-"
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float | int) else f"{k}={v}" for k, v in values.items()
    )


def pretty(item: dict[str, Any], color: bool = False) -> str:
    """One message as a line for people (``sensorcast subscribe --pretty``).

    Examples:
        >>> line = pretty({"type": "prediction", "seq": 7, "sensor_id": "pump-7",
        ...         "ts": "2026-11-25T19:00:00.250Z", "values": {"value": 80.0},
        ...         "forecast": {"value": 21.7}, "anomaly_score": 0.998,
        ...         "is_anomaly": True, "status": "ok", "model_version": 3})
        >>> print(line)
        19:00:00.250  #7       pump-7            value=80  next value=21.7  score 1.00  v3  ANOMALY
        >>> pretty({"type": "lagged", "dropped": 12})
        'lagged: 12 messages dropped for this client'
    """
    kind = item.get("type")
    if kind == "prediction":
        ts = str(item.get("ts", ""))
        clock = ts[11:23] if len(ts) >= 19 else ts
        score = item.get("anomaly_score")
        status = item.get("status")
        if status == "ok":
            verdict = "ANOMALY" if item.get("is_anomaly") else "ok"
        elif status == "error":
            verdict = f"error: {item.get('reason', '')}"
        else:
            verdict = str(status).replace("_", " ")
        line = (
            f"{clock:<12}  #{item.get('seq', '?'):<6}  {item.get('sensor_id', ''):<16}  "
            f"{_numbers(item.get('values'))}  next {_numbers(item.get('forecast'))}  "
            f"score {'-' if score is None else f'{score:.2f}'}  v{item.get('model_version', 0)}  "
            f"{verdict}"
        )
        if color and item.get("is_anomaly"):
            return f"{_RED}{_BOLD}{line}{_RESET}"
        if color and status != "ok":
            return f"{_DIM}{line}{_RESET}"
        return line
    if kind == "model":
        return (
            f"model: {item.get('sensor_id')} now runs version {item.get('model_version')} "
            f"(#{item.get('seq')})"
        )
    if kind == "hello":
        return f"connected: epoch {item.get('epoch')}, latest seq {item.get('seq')}"
    if kind == "lagged":
        return f"lagged: {item.get('dropped')} messages dropped for this client"
    if kind == "gap" and "missed" not in item:
        return (
            f"gap: new epoch {item.get('epoch')} (was {item.get('previous_epoch')}); "
            f"numbering goes on at #{item.get('from_seq')}: resynchronise"
        )
    if kind == "gap":
        return (
            f"gap: {item.get('missed')} messages no longer kept "
            f"(#{item.get('from_seq')} to #{item.get('to_seq')})"
        )
    return json.dumps(item, separators=(",", ":"))


class Printer:
    """Writes messages as JSON lines and remembers where to resume."""

    def __init__(
        self, out: TextIO, since: int | None, count: int | None, human: bool = False
    ) -> None:
        self.out = out
        self.human = human
        self.color = human and out.isatty() and "NO_COLOR" not in os.environ
        self.last_seq = since
        self.epoch: str | None = None
        self.count = count
        self.printed = 0

    @property
    def done(self) -> bool:
        return self.count is not None and self.printed >= self.count

    def handle(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "hello":
            # A changed epoch is announced by the gap frame that follows.
            self.epoch = message.get("epoch")
            if self.last_seq is None:
                self.last_seq = message.get("seq")
            if self.human:
                self.out.write(pretty(message, self.color) + "\n")
            return
        if kind == "subscribed":
            return
        if kind == "gap" and message.get("reason") == "epoch_changed":
            # Resume in the new epoch: after its first messages (a live renumbering), or
            # from its start (a resume across a restart, whose from_seq is 1).
            self.epoch = message.get("epoch", self.epoch)
            self.last_seq = int(message.get("from_seq", 1)) - 1
        items = message["items"] if kind == "predictions" else [message]
        for item in items:
            if self.done:
                return
            seq = item.get("seq")
            if item.get("type") in {"prediction", "model"} and isinstance(seq, int):
                if not item.get("snapshot"):
                    self.last_seq = seq
            if self.human:
                self.out.write(pretty(item, self.color) + "\n")
            else:
                self.out.write(json.dumps(item, separators=(",", ":")) + "\n")
            if item.get("type") == "prediction":
                self.printed += 1
        self.out.flush()


async def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Print every message after ``--since`` (or from now); reconnect with backoff."""
    printer = Printer(out, args.since, args.count, getattr(args, "pretty", False))
    printer.epoch = getattr(args, "epoch", None)
    delay = 0.2
    while True:
        url = build_url(args.url, args, printer.last_seq, printer.epoch)
        try:
            async with websockets.connect(url, max_size=None, open_timeout=10) as ws:
                delay = 0.2
                async for raw in ws:
                    printer.handle(json.loads(raw))
                    if printer.done:
                        return 0
        except websockets.InvalidStatus as exc:
            status = exc.response.status_code
            if status in REFUSED:
                body = exc.response.body.decode(errors="replace") if exc.response.body else ""
                print(f"sensorcast: the server refused: HTTP {status} {body}", file=sys.stderr)
                return 1
        except (OSError, TimeoutError, websockets.ConnectionClosed, websockets.InvalidHandshake):
            pass
        print(f"sensorcast: disconnected; reconnecting in {delay:.1f} s", file=sys.stderr)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)
