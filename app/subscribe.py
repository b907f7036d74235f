"""``sensorcast subscribe``: print predictions as JSON lines, reconnecting and resuming."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from urllib.parse import urlencode, urlsplit, urlunsplit

import websockets


def build_url(base: str, args: argparse.Namespace, since: int | None) -> str:
    """The WebSocket URL with the query for the filters and the resume point.

    Examples:
        >>> ns = argparse.Namespace(sensor=["pump-*"], anomalies_only=True, batch=False, key=None)
        >>> build_url("ws://h:1/v1/ws/predictions", ns, 7)
        'ws://h:1/v1/ws/predictions?sensor=pump-%2A&anomalies_only=true&since=7'
    """
    query: list[tuple[str, str]] = [("sensor", s) for s in args.sensor]
    if args.anomalies_only:
        query.append(("anomalies_only", "true"))
    if getattr(args, "batch", False):
        query.append(("batch", "true"))
    if since is not None:
        query.append(("since", str(since)))
    if getattr(args, "key", None):
        query.append(("key", args.key))
    parts = urlsplit(base)
    joined = "&".join(q for q in (parts.query, urlencode(query)) if q)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, joined, ""))


async def run(args: argparse.Namespace) -> int:
    """Print every message after ``--since`` (or from now); reconnect with backoff."""
    last_seq: int | None = args.since
    printed = 0
    delay = 0.5
    out = sys.stdout
    while True:
        try:
            async with websockets.connect(build_url(args.url, args, last_seq)) as ws:
                delay = 0.5
                async for raw in ws:
                    message = json.loads(raw)
                    items = message["items"] if message.get("type") == "predictions" else [message]
                    for item in items:
                        seq = item.get("seq")
                        if item.get("type") in {"prediction", "model"} and isinstance(seq, int):
                            last_seq = seq
                        out.write(json.dumps(item, separators=(",", ":")) + "\n")
                        if item.get("type") == "prediction":
                            printed += 1
                    out.flush()
                    if args.count is not None and printed >= args.count:
                        return 0
        except websockets.InvalidStatus as exc:
            status = exc.response.status_code
            if status in {400, 401, 403, 404}:
                print(f"sensorcast: the server refused: HTTP {status}", file=sys.stderr)
                return 1
        except (OSError, websockets.ConnectionClosed, websockets.InvalidHandshake):
            pass
        print(f"sensorcast: disconnected; reconnecting in {delay:.1f} s", file=sys.stderr)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)
