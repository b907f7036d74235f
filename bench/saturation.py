"""Saturation: end to end at full load, with responsiveness and memory under that load.

The service runs as ``sensorcast serve`` with its default settings (access log on) in its own
process; every other part runs in processes of its own, as in production:

- load generators (``bench/_loadgen.py``, 2 processes x 3 connections) post 1,000-reading
  bodies as fast as they are taken, each connection with its own sensors, readings in order
  with rising ``ts``, honouring ``503 Retry-After`` (then sending the same body again);
- one ``batch=true`` WebSocket subscriber (``bench/_subscriber.py``) counts the predictions
  it receives: the end-to-end rate, POST to frame;
- a prober (``bench/_prober.py``) GETs ``/healthz`` every 10 ms: p50/p99 from outside;
- at the end of the window, ``GET /v1/debug/loop-lag`` gives the service's event-loop lag
  p99 over it, and a bare event loop in a process of its own (``bench/_floor.py``) the lag
  the operating system alone adds beside the same load: the floor under the service's;
  the service's RSS is read from ``/proc`` before the load and every second of it;
- the CPU each group of processes used over the window: the service, its
  model processes, and this bench's own (load generators, subscriber, prober, bare loop), so
  that the end-to-end rate can be read against what the load itself took of the cores.

The end-to-end rate is set against the model stage alone, measured in the same run on the
same work (``bench.scaling.run_runners`` with one model process per core, on the batches
the service's model processes get under this load: :func:`load_work`). The same load then
runs with ``admission_wait_ms=1000`` (requests wait for room in full queues; shorter window),
with ``loop_slice_us=0`` (the event loop on the kernel's default time slice; as short), with
the default model from its Python source (``SENSORCAST_COMPILED_MODEL=0``; as short), then
on the Redis topology (one API, one ``sensorcast worker``, a throwaway redis-server):
end-to-end rate, loop lag, ``/healthz`` and the API process's memory.

Run: ``python -m bench.saturation [--quick] [--json PATH]``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import psutil

from app.config import Settings
from app.pipeline import wire
from app.pipeline.ingest import Ingestor, RecentIds, ShardQueue
from bench._common import ROOT, Results, Server, parse_args, process_cpu_s, service
from bench._workload import Stream, sensor_ids
from bench.e2e import result_of, subscribe
from bench.scaleout import redis_server, worker
from bench.scaling import Work

LOADGENS = 2
CONNECTIONS = 3
SENSORS_PER_CONNECTION = 170
MIB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    """Resident memory of one process (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main_thread_schedstat(pid: int) -> tuple[int, int] | None:
    """Nanoseconds the process's main thread has run and has waited runnable for a core
    (Linux ``schedstat``); None where the kernel does not say."""
    try:
        ran, waited, _ = (
            int(x) for x in Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
        )
    except (OSError, ValueError):
        return None
    return ran, waited


def cpu_seconds(pid: int) -> float:
    """:func:`~bench._common.process_cpu_s`, and 0 once the process is gone."""
    try:
        return process_cpu_s(pid)
    except psutil.NoSuchProcess:
        return 0.0


def _spawn(module: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", module, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )


def _result(proc: subprocess.Popen[str], timeout_s: float) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout_s)
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[7:])
            return result
    raise RuntimeError(f"{proc.args!r} gave no result: {out[-1000:]}")


def load_work() -> Work:
    """The batches the service's model processes get under this load, for the model stage
    alone: each connection's requests of 1,000 readings of its own sensors (as
    ``bench/_loadgen.py`` sends them), taken in turn, admitted by the service's own
    ``Ingestor`` and cut into batches by its ``ShardQueue.take``."""
    streams = [
        Stream(sensor_ids(SENSORS_PER_CONNECTION, prefix=f"g{n}c{c}"))
        for n in range(LOADGENS)
        for c in range(CONNECTIONS)
    ]
    limit = Settings().batch_max_size

    def work(shards: int, until: int) -> list[list[wire.Packed]]:
        queues = [ShardQueue(1 << 62) for _ in range(shards)]
        ingestor = Ingestor(queues, RecentIds(window_s=0, max_ids=0))
        while min(s.per_sensor for s in streams) < until:
            for stream in streams:
                ingestor.offer(stream.take(1_000))
        out: list[list[wire.Packed]] = []
        for queue in queues:
            batches = []
            while queue.waiting:
                batches.append(queue.take(limit))
            out.append(batches)
        return out

    return work


def saturate(
    svc: Server, warmup_s: float, duration_s: float, model_host: int | None = None
) -> dict[str, Any]:
    """Run the load against ``svc``; every figure of the window after ``warmup_s``.

    ``model_host``: the process whose descendants run the models (a ``sensorcast worker``
    on the Redis topology), when it is not the service itself.
    """
    time.sleep(1.0)  # idle: nothing posted yet
    idle = rss_bytes(svc.pid)
    t0 = time.time() + 1.5
    start, end = t0 + warmup_s, t0 + warmup_s + duration_s
    stop = end + 0.5
    sub = subscribe(svc.ws_url + "?batch=true", start, end, latency=False)
    window = ("--start", str(start), "--end", str(end))
    prober = _spawn("bench._prober", svc.url + "/healthz", *window)
    floor = _spawn("bench._floor", *window)
    loadgens = [
        _spawn(
            "bench._loadgen",
            svc.url,
            "--connections",
            str(CONNECTIONS),
            "--sensors",
            str(SENSORS_PER_CONNECTION),
            "--prefix",
            f"g{n}c",
            *window,
            "--stop",
            str(stop),
        )  # fmt: skip
        for n in range(LOADGENS)
    ]
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            samples.append((time.time(), rss_bytes(svc.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        time.sleep(max(0.0, start - time.time()))
        # Who used the two cores over the window: the service, its model processes, and
        # this bench's own processes (load generators, subscriber, prober, bare loop).
        host = psutil.Process(svc.pid if model_host is None else model_host)
        models = [p.pid for p in host.children(recursive=True)]
        if model_host is not None:
            models.append(model_host)
        bench_pids = [p.pid for p in (*loadgens, prober, floor, sub)]
        groups = {"service": [svc.pid], "models": models, "bench": bench_pids}
        cpu_start = {pid: cpu_seconds(pid) for pids in groups.values() for pid in pids}
        sched_start = main_thread_schedstat(svc.pid)
        time.sleep(max(0.0, end - time.time()))
        sched_end = main_thread_schedstat(svc.pid)
        # A process gone meanwhile (a model process replaced) counts for nothing, not less.
        cpu = {
            name: sum(max(0.0, cpu_seconds(pid) - cpu_start[pid]) for pid in pids)
            / duration_s * 100
            for name, pids in groups.items()
        }  # fmt: skip
        lag = httpx.get(f"{svc.url}/v1/debug/loop-lag", params={"window_s": duration_s}).json()
        loads = [_result(p, stop - time.time() + 60) for p in loadgens]
        probe = _result(prober, 30)
        bare = _result(floor, 30)
        delivered = result_of(sub)
    finally:
        done.set()
        sampler.join()
        for p in [*loadgens, prober, floor, sub]:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    after_warmup = [rss for t, rss in samples if t >= start]
    return {
        "delivered": delivered["rate"],
        "dropped": delivered["dropped"],
        "accepted": sum(x["accepted"] for x in loads) / duration_s,
        "refused": sum(x["refused"] for x in loads) / duration_s,
        "failed": sum(x["failed"] for x in loads),
        "healthz_p50_ms": probe["p50_ms"],
        "healthz_p99_ms": probe["p99_ms"],
        "healthz_failed": probe["failed"],
        "loop_lag_p99_ms": lag["p99_ms"],
        "floor_lag_p99_ms": bare["p99_ms"],
        # The loop's thread: how busy, and how long it waited runnable for a core (the lag
        # that no work of its own explains).
        "cpu": cpu,
        "main_thread": (
            None
            if sched_start is None or sched_end is None
            else [
                (b - a) / 1e9 / duration_s * 100
                for a, b in zip(sched_start, sched_end, strict=True)
            ]
        ),
        "rss_idle": idle,
        "rss_warm": after_warmup[0] if after_warmup else 0,
        "rss_end": after_warmup[-1] if after_warmup else 0,
        "rss_max": max((rss for _, rss in samples), default=0),
        "rss_series": [(round(t - t0, 1), rss / MIB) for t, rss in samples],
    }


def report(results: Results, label: str, r: dict[str, Any], stage: float | None) -> None:
    item = f"saturation {label}"
    if stage is not None:
        e2e_ratio = r["delivered"] / stage if stage else 0.0
        results.row(
            item, "POST -> batch=true frame, readings/s", r["delivered"], "readings/s",
            baseline="model stage alone", baseline_value=stage,
            target=">= 0.6x and >= 100k/s",
            met=e2e_ratio >= 0.6 and r["delivered"] >= 100_000,
        )  # fmt: skip
    else:
        results.row(item, "POST -> batch=true frame, readings/s", r["delivered"], "readings/s")
    results.row(item, "accepted (202)", r["accepted"], "readings/s")
    results.row(item, "refused (503, Retry-After honoured)", r["refused"], "requests/s")
    results.row(item, "frames dropped for the subscriber", r["dropped"], "messages")
    results.row(item, "/healthz p50 from another process", r["healthz_p50_ms"], "ms")
    results.row(
        item, "/healthz p99 from another process", r["healthz_p99_ms"], "ms",
        target="<= 20 ms", met=r["healthz_p99_ms"] <= 20,
    )  # fmt: skip
    results.row(
        item, "event-loop lag p99", r["loop_lag_p99_ms"], "ms",
        target="<= 5 ms", met=r["loop_lag_p99_ms"] <= 5,
    )  # fmt: skip
    results.row(
        item, "event-loop lag p99 of a bare loop beside the same load", r["floor_lag_p99_ms"],
        "ms",
    )  # fmt: skip
    cpu = r["cpu"]
    results.row(item, "CPU of the service process", cpu["service"], "% of a core")
    models = "the worker and its model processes" if "redis" in label else "the model processes"
    results.row(item, f"CPU of {models}", cpu["models"], "% of a core")
    results.row(
        item, "CPU of this bench's load generators, subscriber and probes", cpu["bench"],
        "% of a core",
    )  # fmt: skip
    if r["main_thread"] is not None:
        ran, waited = r["main_thread"]
        results.row(item, "service main thread on a core", ran, "% of the window")
        results.row(
            item, "service main thread runnable, waiting for a core", waited, "% of the window"
        )
    growth = (r["rss_end"] - r["rss_idle"]) / MIB
    drift = (r["rss_end"] - r["rss_warm"]) / MIB
    results.row(item, "service RSS idle", r["rss_idle"] / MIB, "MiB")
    results.row(
        item, "service RSS growth over idle, end of the load", growth, "MiB",
        target="<= +100 MiB", met=growth <= 100,
    )  # fmt: skip
    results.row(
        item, "service RSS growth after warm-up", drift, "MiB",
        target="flat (<= +20 MiB)", met=drift <= 20,
    )  # fmt: skip


Figure = tuple[str, tuple[str, ...], str]
"""A row of a variant's figures: its measure, its key in :func:`saturate`'s result (a path
into nested dicts), its unit."""
DELIVERED: Figure = ("POST -> batch=true frame, readings/s", ("delivered",), "readings/s")
LOOP_LAG: Figure = ("event-loop lag p99", ("loop_lag_p99_ms",), "ms")


def side_by_side(
    results: Results,
    item: str,
    variant: dict[str, Any],
    default: dict[str, Any],
    baseline: str,
    figures: list[Figure],
) -> None:
    """Rows of a variant of the load's figures, each set against the default's."""
    for measure, path, unit in figures:
        value: Any = variant
        base: Any = default
        for key in path:
            value, base = value[key], base[key]
        results.row(
            item, measure, float(value), unit, baseline=baseline, baseline_value=float(base)
        )


def main() -> None:
    args = parse_args(__doc__ or "")
    warmup_s, duration_s = (5.0, 12.0) if args.quick else (10.0, 60.0)
    redis_s = 10.0 if args.quick else 30.0
    results = Results("saturation")
    cores = os.cpu_count() or 1

    import asyncio

    from bench.scaling import run_runners

    stage = asyncio.run(run_runners(cores, 300 if args.quick else 700, work=load_work()))
    results.row(
        "saturation", f"model stage alone, {cores} processes, the load's batches", stage,
        "readings/s",
    )  # fmt: skip

    with service(log_level="info") as svc:
        memory = saturate(svc, warmup_s, duration_s)
    report(results, "memory://", memory, stage)
    # The same load with requests waiting up to a second for room in full queues: what the
    # wait is worth on this machine, side by side with the default (refused at once).
    with service(log_level="info", admission_wait_ms=1000) as svc:
        waiting = saturate(svc, warmup_s, redis_s)
    item = "saturation memory://, admission_wait_ms=1000"
    baseline = "the default, refused at once"
    side_by_side(results, item, waiting, memory, baseline, [DELIVERED])
    results.row(item, "refused (503, Retry-After honoured)", waiting["refused"], "requests/s")
    side_by_side(results, item, waiting, memory, baseline, [LOOP_LAG])

    # The same load with the event loop on the kernel's default time slice: what the short
    # slice (loop_slice_us, app/scheduling.py) is worth here, side by side.
    with service(log_level="info", loop_slice_us=0) as svc:
        default_slice = saturate(svc, warmup_s, redis_s)
    side_by_side(
        results, "saturation memory://, loop_slice_us=0", default_slice, memory,
        "loop_slice_us=100 (the default)",
        [
            LOOP_LAG,
            ("event-loop lag p99 of a bare loop beside the same load", ("floor_lag_p99_ms",), "ms"),
            ("/healthz p99 from another process", ("healthz_p99_ms",), "ms"),
            DELIVERED,
        ],
    )  # fmt: skip

    # The same load with the default model run from its Python source rather than compiled
    # (app/models/compiled.py): what compiling it is worth end to end, side by side.
    with service(log_level="info", compiled_model=0) as svc:
        source = saturate(svc, warmup_s, redis_s)
    side_by_side(
        results, "saturation memory://, model from its Python source", source, memory,
        "compiled (the default)",
        [DELIVERED, ("CPU of the model processes", ("cpu", "models"), "% of a core")],
    )  # fmt: skip

    with redis_server() as url, ExitStack() as stack:
        host = stack.enter_context(worker(url, cores))
        svc = stack.enter_context(service(backend=url, log_level="info"))
        redis = saturate(svc, warmup_s, redis_s, model_host=host.pid)
    report(results, "redis://", redis, None)
    results.note(
        f"{LOADGENS} load generator processes x {CONNECTIONS} connections, "
        f"{LOADGENS * CONNECTIONS * SENSORS_PER_CONNECTION} sensors, 1,000 readings a request; "
        f"window {duration_s:.0f} s after {warmup_s:.0f} s of warm-up (redis://, "
        f"admission_wait_ms=1000, loop_slice_us=0 and the model from source: {redis_s:.0f} s)"
    )
    results.series["saturation_rss"] = {
        "kind": "line",
        "x": [t for t, _ in memory["rss_series"]],
        "y": [m for _, m in memory["rss_series"]],
        "xlabel": "seconds since the load started",
        "ylabel": "service RSS, MiB",
        "title": "Service memory at saturation (memory://)",
    }
    results.write(args.json)


if __name__ == "__main__":
    main()
