"""End to end: POST -> prediction frame latency at fixed offered rates, while models refit.

Readings are offered at 1k, 5k and 10k readings/s (100 requests/s); each reading's ``ts`` is
its send time (so each sensor's readings come in order, on the service's refit cadence), and
one subscriber (its own process) takes ``receive time - ts`` for each prediction. The default
model refits inline as each sensor's cadence says, so fits run throughout; the model frames
seen are reported, with the service's event-loop lag over each window. Throughput at
saturation is ``bench/saturation.py``.

Run: ``python -m bench.e2e [--quick] [--json PATH]``
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx

from bench._common import ROOT, Results, paced_posts, parse_args, service

RATES = (1_000, 5_000, 10_000)
REQUESTS_PER_S = 100
LATENCY_SENSORS = 20


def subscribe(url: str, start: float, end: float, latency: bool) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "bench._subscriber", url, "--start", str(start), "--end", str(end)]
    if latency:
        cmd.append("--latency")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "READY":
        proc.kill()
        raise RuntimeError(f"subscriber did not start: {line!r}")
    return proc


def result_of(proc: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=60)
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[7:])
            return result
    raise RuntimeError(f"subscriber gave no result: {out[-1000:]}")


def _latency_body(per_request: int) -> Callable[[int], bytes]:
    def body(n: int) -> bytes:
        now = time.time()
        items = [
            {"sensor_id": f"lat-{(n * per_request + i) % LATENCY_SENSORS}", "ts": now,
             "value": 20.0 + ((n * 7 + i * 13) % 17) / 10}
            for i in range(per_request)
        ]  # fmt: skip
        return json.dumps(items).encode()

    return body


async def offer(url: str, rate: int, until: float) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=30) as client:
        return await paced_posts(
            client, url + "/v1/readings", requests_per_s=REQUESTS_PER_S,
            duration_s=until - time.time(), body=_latency_body(rate // REQUESTS_PER_S),
        )  # fmt: skip


def main() -> None:
    args = parse_args(__doc__ or "")
    warmup_s, duration_s = (1.0, 2.5) if args.quick else (2.0, 6.0)
    results = Results("e2e")
    latencies: dict[int, dict[str, Any]] = {}
    with service() as svc:
        for rate in RATES:
            start = time.time() + 1.0 + warmup_s
            end = start + duration_s
            sub = subscribe(svc.ws_url, start, end, latency=True)
            sent = asyncio.run(offer(svc.url, rate, end + 0.2))
            r = result_of(sub)
            lag = httpx.get(f"{svc.url}/v1/debug/loop-lag", params={"window_s": duration_s})
            r["loop_lag_p99_ms"] = lag.json()["p99_ms"]
            latencies[rate] = r
            print(
                f"offered {rate:,}/s: delivered {r['rate']:,.0f}/s, POST->frame p50 "
                f"{r['p50_ms']:.1f} p99 {r['p99_ms']:.1f} max {r['max_ms']:.1f} ms, "
                f"{r['models']} model frames, loop lag p99 {r['loop_lag_p99_ms']:.2f} ms, "
                f"subscriber CPU {r['client_cpu']:.2f}, dropped for it {r['dropped']}, "
                f"requests {sent}",
                flush=True,
            )
    for rate in RATES:
        r = latencies[rate]
        target = {"target": "<= 20 ms", "met": r["p99_ms"] <= 20} if rate == 10_000 else {}
        results.row("e2e", f"POST -> frame p50 at {rate // 1000}k readings/s", r["p50_ms"], "ms")
        results.row(
            "e2e", f"POST -> frame p99 at {rate // 1000}k readings/s", r["p99_ms"], "ms", **target
        )
        results.row(
            "e2e", f"delivered at {rate // 1000}k readings/s offered", r["rate"], "readings/s"
        )
        results.row("e2e", f"model swaps seen at {rate // 1000}k readings/s", r["models"], "frames")
        results.row(
            "e2e", f"event-loop lag p99 at {rate // 1000}k readings/s", r["loop_lag_p99_ms"], "ms"
        )
    results.series["latency"] = {
        "kind": "line",
        "x": list(RATES),
        "y": [latencies[r]["p99_ms"] for r in RATES],
        "y2": [latencies[r]["p50_ms"] for r in RATES],
        "labels": ["p99", "p50"],
        "xlabel": "offered readings/s",
        "ylabel": "POST -> frame ms",
        "title": "End-to-end latency while retraining",
    }
    results.write(args.json)


if __name__ == "__main__":
    main()
