"""A measuring WebSocket subscriber, run as its own process by ``bench/e2e.py``.

``python -m bench._subscriber WS_URL --start T0 --end T1 [--latency]`` connects, prints
``READY`` once the hello frame arrived, counts the predictions and model frames received
between the epoch times T0 and T1, and prints one ``RESULT {json}`` line. With ``--latency``
it decodes each prediction and takes ``now - ts`` (the load generator stamps each reading's
``ts`` with its send time, on the same clock), so it measures POST to frame.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import datetime

import msgspec
from websockets.asyncio.client import connect

from bench._common import percentile

_frame = msgspec.json.Decoder()


async def run(url: str, start: float, end: float, latency: bool) -> dict[str, float]:
    predictions = models = lagged = 0
    latencies: list[float] = []
    cpu0 = wall0 = 0.0
    async with connect(url, max_size=None, compression=None, ping_interval=None) as ws:
        await ws.recv()
        print("READY", flush=True)
        while True:
            remaining = end - time.time()
            if remaining <= 0:
                break
            try:
                # Text frames as they came, not decoded: counting needs no str.
                frame = await asyncio.wait_for(ws.recv(decode=False), remaining)
            except TimeoutError:
                break
            now = time.time()
            if now < start:
                continue
            if not cpu0:
                cpu0, wall0 = time.process_time(), time.perf_counter()
            models += frame.count(b'"type":"model"')
            if frame.startswith((b'{"type": "lagged"', b'{"type":"lagged"')):
                lagged += int(json.loads(frame)["dropped"])
                continue
            if not latency:
                predictions += frame.count(b'"type":"prediction"')
                continue
            message = _frame.decode(frame)
            items = message["items"] if message["type"] == "predictions" else [message]
            for item in items:
                if item["type"] == "prediction":
                    predictions += 1
                    sent = datetime.fromisoformat(item["ts"]).timestamp()
                    latencies.append((now - sent) * 1e3)
    busy = (time.process_time() - cpu0) / (time.perf_counter() - wall0) if cpu0 else 0.0
    return {
        "predictions": predictions,
        "models": models,
        "dropped": lagged,
        "rate": predictions / (end - start),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies) if latencies else float("nan"),
        "client_cpu": busy,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--start", type=float, required=True)
    parser.add_argument("--end", type=float, required=True)
    parser.add_argument("--latency", action="store_true")
    args = parser.parse_args()
    import uvloop

    result = uvloop.run(run(args.url, args.start, args.end, args.latency))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
