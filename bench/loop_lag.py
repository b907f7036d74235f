"""Responsiveness while models retrain: the model work inline, in threads, or in processes.

The service runs three times, with ``SENSORCAST_EXECUTOR=inline`` (the model work on the
event loop), ``thread`` (``asyncio.to_thread``-style: a thread pool in the service process)
and ``process`` (the default: shard and trainer processes), always with the benchmark model
``bench.heavy:Model``, whose refits train an IsolationForest (about 100 ms each). The same
open-loop load (2,000 readings/s over 20 sensors, so some sensor always wants a refit) runs
against each while ``/healthz`` is probed every 10 ms. Reported: the service's own
event-loop lag (``/v1/debug/loop-lag`` over the load window) and the probe's latency.

Run: ``python -m bench.loop_lag [--quick] [--json PATH]``
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx

from bench._common import (
    Results,
    paced_posts,
    parse_args,
    percentile,
    probe_latency,
    ratio,
    service,
)

MODES = ("inline", "thread", "process")
SENSORS = 20
READINGS_PER_REQUEST = 20
REQUESTS_PER_S = 100


def _body(n: int) -> bytes:
    now = time.time()
    items = [
        {"sensor_id": f"heavy-{(n * READINGS_PER_REQUEST + i) % SENSORS}", "ts": now,
         "value": 20.0 + ((n * 7 + i * 13) % 17) / 10}
        for i in range(READINGS_PER_REQUEST)
    ]  # fmt: skip
    return json.dumps(items).encode()


async def measure(url: str, warmup_s: float, duration_s: float) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await paced_posts(
            client, url + "/v1/readings", requests_per_s=REQUESTS_PER_S, duration_s=warmup_s,
            body=_body,
        )  # fmt: skip
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=url, timeout=30) as probe_client:
            probe = asyncio.create_task(
                probe_latency(probe_client, url + "/healthz", interval_s=0.01, stop=stop)
            )
            started = time.monotonic()
            sent = await paced_posts(
                client, url + "/v1/readings", requests_per_s=REQUESTS_PER_S,
                duration_s=duration_s, body=_body,
            )  # fmt: skip
            window = time.monotonic() - started
            stop.set()
            health = await probe
        lag = (await client.get("/v1/debug/loop-lag", params={"window_s": window})).json()
        sensors = (await client.get("/v1/sensors")).json()
    items = sensors.get("sensors", sensors) if isinstance(sensors, dict) else sensors
    fits = sum(int(s.get("model_version") or 0) for s in items)
    return {
        "lag": lag,
        "healthz_p50_ms": percentile(health, 50),
        "healthz_p99_ms": percentile(health, 99),
        "healthz_max_ms": max(health) if health else float("nan"),
        "probes": len(health),
        "sent": sent,
        "fits": fits,
    }


def main() -> None:
    args = parse_args(__doc__ or "")
    warmup_s, duration_s = (1.5, 3.0) if args.quick else (3.0, 10.0)
    results = Results("loop_lag")
    by_mode: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        with service(executor=mode, model="bench.heavy:Model", workers=2) as svc:
            m = asyncio.run(measure(svc.url, warmup_s, duration_s))
        by_mode[mode] = m
        lag = m["lag"]
        print(
            f"{mode:8s} loop lag p50 {lag['p50_ms']:.3f} p99 {lag['p99_ms']:.3f} "
            f"max {lag['max_ms']:.1f} ms ({lag['samples']} samples); /healthz p99 "
            f"{m['healthz_p99_ms']:.1f} ms; sent {m['sent']}; model versions {m['fits']}",
            flush=True,
        )
    inline_p99 = by_mode["inline"]["lag"]["p99_ms"]
    for mode in MODES:
        m = by_mode[mode]
        lag = m["lag"]
        if mode == "process":
            lower = ratio(inline_p99, lag["p99_ms"])
            results.row(
                "loop lag", "event-loop lag p99, process pool", lag["p99_ms"], "ms",
                baseline="inline", baseline_value=inline_p99, ratio_value=lower,
                target="<= 1 ms and >= 100x lower than inline",
                met=lag["p99_ms"] <= 1.0 and lower >= 100,
            )  # fmt: skip
        else:
            results.row("loop lag", f"event-loop lag p99, {mode}", lag["p99_ms"], "ms")
        results.row("loop lag", f"event-loop lag p50, {mode}", lag["p50_ms"], "ms")
        if mode == "process":
            results.row(
                "loop lag", "event-loop lag max, process", lag["max_ms"], "ms",
                baseline="inline", baseline_value=by_mode["inline"]["lag"]["max_ms"],
                ratio_value=ratio(by_mode["inline"]["lag"]["max_ms"], lag["max_ms"]),
            )  # fmt: skip
        else:
            results.row("loop lag", f"event-loop lag max, {mode}", lag["max_ms"], "ms")
        results.row("loop lag", f"/healthz p99 while retraining, {mode}", m["healthz_p99_ms"], "ms")
        results.row("loop lag", f"models fitted during the run, {mode}", m["fits"], "fits")
    results.series["loop_lag"] = {
        "kind": "bar",
        "x": list(MODES),
        "y": [by_mode[m]["lag"]["p99_ms"] for m in MODES],
        "y2": [by_mode[m]["healthz_p99_ms"] for m in MODES],
        "labels": ["event-loop lag p99", "/healthz p99"],
        "xlabel": "where the model work runs",
        "ylabel": "ms (log)",
        "log": True,
        "title": "Responsiveness while retraining",
    }
    results.write(args.json)


if __name__ == "__main__":
    main()
