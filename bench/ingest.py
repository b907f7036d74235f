"""Ingest: POST /v1/readings against no-op endpoints that only parse, in the same run.

- one reading per request against a FastAPI route taking one pydantic reading (``/one``);
- 1,000 readings per request against a route that only decodes the same body with msgspec
  (``/parse-msgspec``), and one with a pydantic ``list[Reading]`` body.

The service and the reference app run at the same time on loopback, each one uvicorn process
(the service's model workers are extra processes), and the configurations are interleaved and
repeated so that the machine's noise hits both sides alike; ratios are taken per repetition,
then the median. Beside the rate, the CPU the server's own process spends per request (all
its threads; not the service's model processes), which moves less with the machine's
noise. Only accepted requests (202) count as ingested; a request the pipeline cannot take
now is answered 503 and reported apart, as refusals. The service runs with its default
settings (key check, request ids and access log as they come).

Run: ``python -m bench.ingest [--quick] [--json PATH]``
"""

from __future__ import annotations

import statistics

from bench._common import (
    Load,
    Results,
    fmt,
    load_tool,
    parse_args,
    post_load,
    process_cpu_s,
    readings_body,
    reference_app,
    service,
)

CONNECTIONS = 64
BATCH_CONNECTIONS = 8


def main() -> None:
    args = parse_args(__doc__ or "")
    reps, duration_s = (1, 2.0) if args.quick else (3, 6.0)
    results = Results("ingest")
    tool = load_tool()
    if tool != "wrk":
        results.note("wrk not found: using the httpx load generator, so figures are client-bound")
    one = readings_body(1, 1)
    batch = readings_body(1000, 100)
    runs: dict[str, list[Load]] = {}
    # Per run: CPU of the server's own process (all its threads; not the service's model
    # processes) per request answered, in µs. Closed-loop req/s on a shared 2-core machine
    # moves with whatever else runs; the CPU a request costs the server moves less.
    cpu_us: dict[str, list[float]] = {}
    # log_level info: the access log is on, as by default (service() quiets it otherwise).
    with reference_app() as ref, service(log_level="info") as svc:
        configs = {
            "ref_one": (ref.url + "/one", one, CONNECTIONS),
            "svc_one": (svc.url + "/v1/readings", one, CONNECTIONS),
            "ref_batch_msgspec": (ref.url + "/parse-msgspec", batch, BATCH_CONNECTIONS),
            "ref_batch_pydantic": (ref.url + "/parse-pydantic", batch, BATCH_CONNECTIONS),
            "svc_batch": (svc.url + "/v1/readings", batch, BATCH_CONNECTIONS),
        }
        for url, body, conns in configs.values():  # warm-up, and JIT-free paths get hot
            post_load(url, body, connections=conns, duration_s=1)
        pids = {"ref": ref.proc.pid, "svc": svc.proc.pid}
        for rep in range(reps):
            for name, (url, body, conns) in configs.items():
                pid = pids[name.partition("_")[0]]
                cpu_before = process_cpu_s(pid)
                load = post_load(url, body, connections=conns, duration_s=duration_s)
                cpu = process_cpu_s(pid) - cpu_before
                runs.setdefault(name, []).append(load)
                cpu_us.setdefault(name, []).append(cpu / max(1, load.requests) * 1e6)
                print(
                    f"rep {rep} {name:20s} {fmt(load.ok_rps):>8s} req/s accepted, "
                    f"{fmt(load.refused_rps)} refused (503), "
                    f"{load.non_2xx - load.refused} other non-2xx, p50 {load.p50_ms:.2f} ms "
                    f"p99 {load.p99_ms:.2f} ms, errors {load.errors}",
                    flush=True,
                )

    def median(name: str, attr: str = "rps") -> float:
        return statistics.median(getattr(r, attr) for r in runs[name])

    def per_rep_ratio(a: str, b: str, attr_a: str = "rps", attr_b: str = "rps") -> float:
        return statistics.median(
            getattr(x, attr_a) / getattr(y, attr_b) for x, y in zip(runs[a], runs[b], strict=True)
        )

    one_ratio = per_rep_ratio("svc_one", "ref_one", "ok_rps", "ok_rps")
    results.row(
        "ingest", "single-reading POST accepted (202), service", median("svc_one", "ok_rps"),
        "req/s", baseline="FastAPI+pydantic no-op", baseline_value=median("ref_one", "ok_rps"),
        ratio_value=one_ratio, target=">= 1.0x", met=one_ratio >= 1.0,
    )  # fmt: skip
    results.row(
        "ingest", "single-reading POST, CPU of the server process per request",
        statistics.median(cpu_us["svc_one"]), "us",
        baseline="FastAPI+pydantic no-op", baseline_value=statistics.median(cpu_us["ref_one"]),
        ratio_value=statistics.median(
            s / r for s, r in zip(cpu_us["svc_one"], cpu_us["ref_one"], strict=True)
        ),
    )  # fmt: skip
    results.row(
        "ingest", "single-reading POST refused (503), service", median("svc_one", "refused_rps"),
        "req/s",
    )  # fmt: skip
    results.row("ingest", "single-reading POST p99, service", median("svc_one", "p99_ms"), "ms")
    results.row(
        "ingest", "batch POST accepted (202, 1,000/request)",
        median("svc_batch", "ok_rps") * 1000, "readings/s",
    )  # fmt: skip
    results.row("ingest", "batch POST refused (503)", median("svc_batch", "refused_rps"), "req/s")
    results.row(
        "ingest", "batch parse-only no-op, msgspec", median("ref_batch_msgspec", "ok_rps") * 1000,
        "readings/s",
    )  # fmt: skip
    results.row(
        "ingest", "batch parse-only no-op, pydantic body",
        median("ref_batch_pydantic", "ok_rps") * 1000, "readings/s",
        baseline="msgspec parse-only no-op",
        baseline_value=median("ref_batch_msgspec", "ok_rps") * 1000,
        ratio_value=per_rep_ratio("ref_batch_pydantic", "ref_batch_msgspec", "ok_rps", "ok_rps"),
    )  # fmt: skip
    results.write(args.json)


if __name__ == "__main__":
    main()
