"""Prometheus metrics, cheap on the hot path.

Most figures are counters the pipeline keeps anyway (queue depths, batches, recoveries,
published messages, subscribers). :class:`Metrics` reads them when ``/metrics`` is scraped,
through a custom collector, rather than updating metric objects per reading: an attribute
increment costs nothing next to a ``Counter.inc()`` behind a lock, and the scrape is rare.

Where a distribution is needed (batch sizes, pool time, latency) it is observed once per
*batch*, never per reading: a batch holds up to ``batch_max_size`` readings (or one request's
share, where that is larger), so the cost per
reading shrinks as load grows. The POST-to-broadcast latency of a batch is observed for its
oldest and its newest reading (readings of a shard's batch are in admission order), which
bounds every reading's latency in the batch from both sides. The histogram therefore counts
batch extremes, not readings: its tail is the worst case, not a per-reading percentile.

Each app has its own registry (``create_app`` builds one), so tests and several apps in one
process do not share state.
"""

from __future__ import annotations

import platform
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from starlette.requests import HTTPConnection

from app import __version__
from app.models import COMPILED

if TYPE_CHECKING:
    from app.edge import RefusalLog
    from app.pipeline.hub import PredictionHub
    from app.pipeline.runner import Done, ShardRunner
    from app.pipeline.wire import Packed

# A ``*_created`` series per counter and histogram is noise to a Prometheus user (rate()
# does not need it) and costs a series each: off for the whole process.
disable_created_metrics()  # type: ignore[no-untyped-call]

NAMESPACE = "sensorcast"

REFUSAL_REASONS = {
    "bad_body": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "too_large": 413,
    "unsupported_media_type": 415,
    "invalid": 422,
    "rate_limited": 429,
    "overloaded": 503,
    "sensor_limit": 507,
}
"""Why a ``POST /v1/readings`` was refused, and its status. Known reasons are exported from
the start (at 0), so ``rate()`` works on the first refusal. ``overloaded`` covers every 503:
a full queue, a backend that does not answer, a service shutting down."""

REFUSAL_BY_STATUS = {401: "unauthorized", 403: "forbidden", 429: "rate_limited"}
"""The reason counted for a request refused for its key."""

WS_REFUSAL_REASONS = {
    400: "bad_query",
    401: "unauthorized",
    403: "forbidden",
    429: "rate_limited",
    503: "shutting_down",
}
"""Why a WebSocket handshake was refused, by the status of its denial. Exported from the
start (at 0)."""


def count_refusal(request: HTTPConnection, reason: str) -> None:
    """Count a refused ``POST /v1/readings`` in its app's metrics; ``reason`` is a key of
    ``REFUSAL_REASONS`` (another word is counted too, under its own label)."""
    metrics: Metrics = request.app.state.metrics
    metrics.count_refusal(reason)


_LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_POOL_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
_REQUEST_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_RECENT_LATENCIES = 4096
LAG_WINDOW_S = 60.0
"""Event-loop lag quantiles cover this many recent seconds."""


class ModelStage(Protocol):
    """What the metrics read of a model stage: the embedded pipeline or a Redis worker."""

    @property
    def runners(self) -> list[ShardRunner]: ...
    @property
    def published(self) -> int: ...
    @property
    def last_seq(self) -> int: ...
    def queue_figures(self) -> list[tuple[str, int, int, int]]:
        """(shard, pending, waiting, capacity) of each queue the stage owns."""
        ...

    def pending(self) -> int: ...


class LagSummary(Protocol):
    @property
    def samples(self) -> int: ...
    @property
    def p50_ms(self) -> float: ...
    @property
    def p99_ms(self) -> float: ...
    @property
    def max_ms(self) -> float: ...


class LagSource(Protocol):
    """An event-loop lag monitor (see ``LoopLagMonitor``)."""

    def summary(self, window_s: float | None = None) -> LagSummary: ...


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of a sorted list (0 when empty).

    Examples:
        >>> percentile([1.0, 2.0, 3.0, 4.0], 50), percentile([1.0, 2.0, 3.0, 4.0], 99)
        (2.0, 4.0)
        >>> percentile([], 50)
        0.0
    """
    if not ordered:
        return 0.0
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


class RequestStats:
    """Count and duration of HTTP requests by method, route template and status.

    Kept as plain lists of bucket counts and turned into a histogram at scrape time: an
    observation is a dict lookup, a bisect and two additions (about a microsecond), where a
    labelled ``Histogram`` would take a lock and a label lookup per request.

    Examples:
        >>> stats = RequestStats((0.1, 1.0))
        >>> stats.observe("GET", "/x", 200, 0.05); stats.observe("GET", "/x", 200, 0.5)
        >>> stats.observe("GET", "/x", 200, 0.1); stats.observe("GET", "/x", 200, 9.0)
        >>> stats.cumulative(("GET", "/x", 200))
        ([('0.1', 2.0), ('1.0', 3.0), ('+Inf', 4.0)], 9.65)
    """

    def __init__(self, buckets_s: tuple[float, ...] = _REQUEST_BUCKETS_S) -> None:
        self.bounds = buckets_s
        self.series: dict[tuple[str, str, int], list[float]] = {}
        """Per (method, route, status): a count per bucket (the last is +Inf), then the sum."""

    def observe(self, method: str, route: str, status: int, duration_s: float) -> None:
        key = (method, route, status)
        row = self.series.get(key)
        if row is None:
            row = self.series[key] = [0.0] * (len(self.bounds) + 2)
        row[bisect_left(self.bounds, duration_s)] += 1
        row[-1] += duration_s

    def cumulative(self, key: tuple[str, str, int]) -> tuple[list[tuple[str, float]], float]:
        """The Prometheus buckets (``le`` and cumulative count) and the sum of one series."""
        row = self.series[key]
        buckets: list[tuple[str, float]] = []
        running = 0.0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), row, strict=False):
            running += count
            buckets.append((bound, running))
        return buckets, round(row[-1], 9)


class Metrics:
    """One app's metrics: plain counters bumped by the routes, per-batch histograms, and a
    collector that reads the pipeline and hub at scrape time.

    ``bind`` attaches the pipeline, hub and lag monitor once the lifespan has built them;
    before that (and after shutdown) only the request counters are exported.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.accepted = 0
        """Readings accepted (each will yield a prediction)."""
        self.duplicates = 0
        """Readings acknowledged again without being processed (a retried ``id``)."""
        self.refused: dict[str, int] = dict.fromkeys(REFUSAL_REASONS, 0)
        self.model_swaps = 0
        self.fit_failures = 0
        self.alarms_raised = 0
        self.alarms_cleared = 0
        self.requests = RequestStats()
        """HTTP requests by method, route template and status (fed by the access middleware)."""
        self.ws_open = 0
        """WebSocket subscriptions accepted and not yet closed."""
        self.ws_accepted = 0
        self.ws_refused: dict[str, int] = dict.fromkeys(WS_REFUSAL_REASONS.values(), 0)
        self.ready: bool | None = None
        """Readiness as ``/readyz`` would answer, refreshed by the ``/metrics`` route."""
        self.workers_live: int | None = None
        """Workers heartbeating in Redis (an API replica on Redis only), refreshed likewise."""
        self.model_versions: dict[str, int] = {}
        """Each retrained sensor's current model version (sensors never fitted are absent)."""
        self.recent_latency_s: deque[tuple[float, float]] = deque(maxlen=_RECENT_LATENCIES)
        """(monotonic time, latency) of recent batches' oldest readings, for the dashboard."""
        self.batch_size = Histogram(
            "sensorcast_batch_size_readings",
            "Readings per batch sent to a shard's worker.",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.pool_seconds = Histogram(
            "sensorcast_pool_batch_seconds",
            "Time a shard's worker took for a batch, seen from the service: from when it could "
            "start it (submitted, or its previous batch done) to the result, IPC included.",
            buckets=_POOL_BUCKETS_S,
            registry=self.registry,
        )
        self.latency = Histogram(
            "sensorcast_e2e_latency_seconds",
            "From a reading's acceptance (POST) to the broadcast of its prediction; observed "
            "for the oldest and the newest reading of each batch.",
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.fit_seconds = Histogram(
            "sensorcast_model_fit_seconds",
            "Time of each model fit, inline in its model process.",
            buckets=_POOL_BUCKETS_S,
            registry=self.registry,
        )
        self.edge: RefusalLog | None = None
        """Connections and requests refused at the edge (see ``app/edge.py``)."""
        self._pipeline: ModelStage | None = None
        self._hub: PredictionHub | None = None
        self._loop_lag: LagSource | None = None
        ProcessCollector(registry=self.registry)
        self.registry.register(_PipelineCollector(self))

    def bind(
        self, pipeline: ModelStage | None, hub: PredictionHub | None, loop_lag: LagSource | None
    ) -> None:
        """Read these objects at scrape time (``None`` to detach them)."""
        self._pipeline, self._hub, self._loop_lag = pipeline, hub, loop_lag

    def count_refusal(self, reason: str) -> None:
        """Count a refused ``POST /v1/readings``; ``reason`` is a key of ``REFUSAL_REASONS``
        (another word is counted too, under its own label)."""
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def count_ws_refusal(self, status: int) -> None:
        """Count a WebSocket handshake refused with this HTTP status."""
        reason = WS_REFUSAL_REASONS.get(status, str(status))
        self.ws_refused[reason] = self.ws_refused.get(reason, 0) + 1

    def observe_batch(self, batch: Packed, done: Done) -> None:
        """Record a batch just published (called by the model stage, once per batch)."""
        count = batch.size
        if count:
            self.batch_size.observe(count)
            now = time.time()
            oldest = now - batch.first_ingested_at
            self.latency.observe(oldest)
            if count > 1:
                self.latency.observe(now - batch.last_ingested_at)
            self.recent_latency_s.append((time.monotonic(), oldest))
        if done.task_s is not None:
            self.pool_seconds.observe(done.task_s)
        outcome = done.outcome
        if outcome.swaps:
            self.model_swaps += len(outcome.swaps)
            for sensor_id, version in outcome.swaps:
                self.model_versions[sensor_id] = version
        for seconds in outcome.fit_seconds:
            self.fit_seconds.observe(seconds)
        self.fit_failures += outcome.fit_failures
        self.alarms_raised += outcome.alarms_raised
        self.alarms_cleared += outcome.alarms_cleared

    def recent_latency_ms(self, window_s: float = 10.0) -> dict[str, float]:
        """p50/p99/max of the recent batches' oldest-reading latency, in milliseconds."""
        horizon = time.monotonic() - window_s
        lat = sorted(v for at, v in self.recent_latency_s if at >= horizon)
        return {
            "p50_ms": round(percentile(lat, 50) * 1e3, 2),
            "p99_ms": round(percentile(lat, 99) * 1e3, 2),
            "max_ms": round((lat[-1] if lat else 0.0) * 1e3, 2),
        }

    def stats(self) -> dict[str, Any]:
        """The live figures the dashboard shows (rates are left to the caller: it polls
        and divides the change in ``accepted`` by the time between polls)."""
        hub, pipeline = self._hub, self._pipeline
        out: dict[str, Any] = {
            "time": time.time(),
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "refused": sum(self.refused.values()),
            "latency": self.recent_latency_ms(),
            "subscribers": len(hub.subscribers) if hub else 0,
            "sensors": len(hub.sensors) if hub else 0,
            "published": pipeline.published if pipeline else 0,
            "pending": pipeline.pending() if pipeline else 0,
            "model_swaps": self.model_swaps,
        }
        if self._loop_lag is not None:
            lag = self._loop_lag.summary(10.0)
            out["loop_lag"] = {"p50_ms": round(lag.p50_ms, 3), "p99_ms": round(lag.p99_ms, 3)}
        return out


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{NAMESPACE}_{name}", doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{NAMESPACE}_{name}", doc, value=value)


class _PipelineCollector(Collector):
    """Reads the counters the pipeline and hub keep, when ``/metrics`` is scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.m
        yield _counter("readings_accepted", "Readings accepted for prediction.", m.accepted)
        yield _counter(
            "readings_duplicate",
            "Readings acknowledged again but not processed: their (sensor_id, id) was "
            "accepted recently.",
            m.duplicates,
        )
        refused = CounterMetricFamily(
            f"{NAMESPACE}_requests_refused",
            "POST /v1/readings requests refused, by reason (nothing of them was taken).",
            labels=("reason", "status"),
        )
        for reason, count in sorted(m.refused.items()):
            refused.add_metric((reason, str(REFUSAL_REASONS.get(reason, 0))), count)
        yield refused
        if m.edge is not None:
            edge = CounterMetricFamily(
                f"{NAMESPACE}_connections_refused",
                "Connections, WebSocket handshakes and requests refused at the edge, by reason "
                "(limits on connections, subscribers, header and body time and size, Host).",
                labels=("reason",),
            )
            for reason, count in sorted(m.edge.counts.items()):
                edge.add_metric((reason,), count)
            yield edge
        yield _counter("model_swaps", "Retrained models swapped in.", m.model_swaps)
        yield _counter(
            "model_fit_failures",
            "Model fits that failed (the sensor kept its model).",
            m.fit_failures,
        )
        info = GaugeMetricFamily(
            f"{NAMESPACE}_build_info",
            "Always 1; the labels say which sensorcast and Python run, and whether the default "
            "model runs compiled (model_code: compiled or python).",
            labels=("version", "python", "model_code"),
        )
        model_code = "compiled" if COMPILED else "python"
        info.add_metric((__version__, platform.python_version(), model_code), 1)
        yield info
        yield from self._http(m)
        if m.ready is not None:
            yield _gauge(
                "ready", "1 when /readyz would answer 200 (at the last scrape), else 0.", m.ready
            )
        if m.workers_live is not None:
            yield _gauge(
                "workers_live",
                "Workers heartbeating in Redis within the lease, as this API replica sees them.",
                m.workers_live,
            )
        yield _counter("alarms_raised", "Alarm episodes raised.", m.alarms_raised)
        yield _counter("alarms_cleared", "Alarm episodes cleared.", m.alarms_cleared)
        versions = m.model_versions
        yield _gauge("models_retrained", "Sensors running a retrained model.", len(versions))
        yield _gauge(
            "model_version_max",
            "Highest model version of any sensor.",
            max(versions.values(), default=0),
        )
        if m._pipeline is not None:
            yield from self._pipeline(m._pipeline)
        if m._hub is not None:
            yield from self._hub(m._hub)
        if m._loop_lag is not None:
            # Gauges over a sliding window, one per figure (as Node.js' prom-client names
            # nodejs_eventloop_lag_p99_seconds): a "quantile" label belongs to summaries only.
            lag = m._loop_lag.summary(LAG_WINDOW_S)
            window = f"over the last {LAG_WINDOW_S:.0f} s (samples before readiness excluded)"
            for figure, value_ms in (("p50", lag.p50_ms), ("p99", lag.p99_ms)):
                yield _gauge(
                    f"event_loop_lag_{figure}_seconds",
                    f"{figure} of the overshoot of a 1 ms timer on the event loop {window}.",
                    value_ms / 1e3,
                )
            yield _gauge(
                "event_loop_lag_max_seconds",
                f"Largest overshoot of a 1 ms timer on the event loop {window}.",
                lag.max_ms / 1e3,
            )

    def _http(self, m: Metrics) -> Iterator[Metric]:
        labels = ("method", "route", "status")
        count = CounterMetricFamily(
            f"{NAMESPACE}_http_requests",
            "HTTP requests answered, by method, route template and status.",
            labels=labels,
        )
        duration = HistogramMetricFamily(
            f"{NAMESPACE}_http_request_duration_seconds",
            "Time from a request's arrival to the end of its response, by method, route "
            "template and status.",
            labels=labels,
        )
        stats = m.requests
        for key in sorted(stats.series):
            buckets, total_s = stats.cumulative(key)
            names = (key[0], key[1], str(key[2]))
            count.add_metric(names, buckets[-1][1])
            duration.add_metric(names, buckets, total_s)
        yield count
        yield duration
        yield _gauge(
            "websocket_connections", "WebSocket subscriptions open now.", m.ws_open
        )  # fmt: skip
        yield _counter(
            "websocket_accepted", "WebSocket subscriptions accepted.", m.ws_accepted
        )  # fmt: skip
        refused = CounterMetricFamily(
            f"{NAMESPACE}_websocket_refused",
            "WebSocket handshakes refused with an HTTP status, by reason.",
            labels=("reason",),
        )
        for reason, n in sorted(m.ws_refused.items()):
            refused.add_metric((reason,), n)
        yield refused

    def _pipeline(self, p: ModelStage) -> Iterator[Metric]:
        figures = p.queue_figures()
        if figures:
            pending = GaugeMetricFamily(
                f"{NAMESPACE}_queue_pending_readings",
                "Readings accepted and not yet published, per shard (POST answers 503 at "
                "capacity).",
                labels=("shard",),
            )
            waiting = GaugeMetricFamily(
                f"{NAMESPACE}_queue_waiting_readings",
                "Readings waiting to be batched, per shard.",
                labels=("shard",),
            )
            capacity = GaugeMetricFamily(
                f"{NAMESPACE}_queue_capacity_readings",
                "Capacity of each shard's queue.",
                labels=("shard",),
            )
            for name, pending_n, waiting_n, capacity_n in figures:
                pending.add_metric((name,), pending_n)
                waiting.add_metric((name,), waiting_n)
                capacity.add_metric((name,), capacity_n)
            yield pending
            yield waiting
            yield capacity
        admission_waits = getattr(p, "admission_waits", None)
        if admission_waits is not None:
            waits, waited_s = admission_waits()
            yield _counter(
                "admission_waits",
                "Times a POST /v1/readings found the shard queues full and waited for room "
                "(up to admission_wait_ms, then 503).",
                waits,
            )
            yield _counter(
                "admission_wait_seconds", "Seconds requests spent waiting for room.", waited_s
            )
        dedup_size = getattr(p, "dedup_size", None)
        if dedup_size is not None:
            yield _gauge(
                "dedup_ids",
                "(sensor_id, id) pairs remembered to acknowledge retries without processing them.",
                dedup_size(),
            )
        batches = CounterMetricFamily(
            f"{NAMESPACE}_batches", "Batches sent to model processes, per shard.", labels=("shard",)
        )
        recoveries = CounterMetricFamily(
            f"{NAMESPACE}_worker_recoveries",
            "Dead model processes recovered from, per shard.",
            labels=("shard",),
        )
        for r in p.runners:
            batches.add_metric((str(r.shard),), r.batches)
            recoveries.add_metric((str(r.shard),), r.recoveries)
        yield batches
        yield recoveries
        yield _counter(
            "poisoned_readings",
            "Readings that killed their model process twice and got an error prediction.",
            sum(r.poisoned for r in p.runners),
        )
        yield _counter(
            "pool_rebuilds", "Model processes replaced.", sum(r.rebuilds for r in p.runners)
        )
        yield _gauge(
            "shards_healthy",
            "Model processes up and taking batches.",
            sum(r.healthy for r in p.runners),
        )
        yield _gauge("shards", "Model processes configured.", len(p.runners))
        yield _counter(
            "published_messages",
            "Messages (predictions, model swaps, alarms) published to subscribers.",
            p.published,
        )
        yield _gauge("last_seq", "Highest seq published.", p.last_seq)

    def _hub(self, hub: PredictionHub) -> Iterator[Metric]:
        yield _gauge("subscribers", "WebSocket subscribers connected.", len(hub.subscribers))
        yield _counter(
            "frames_dropped",
            "Frames dropped for subscribers that fell behind (the slow-client policy).",
            hub.frames_dropped,
        )
        yield _counter(
            "slow_disconnects",
            "Subscribers closed with 1013 for falling behind (policy disconnect).",
            hub.slow_disconnects,
        )
        yield _counter(
            "stalled_disconnects",
            "Subscribers closed with 1013 whose socket took nothing for ws_stall_timeout_s.",
            hub.reaped,
        )
        yield _gauge(
            "alarms_active", "Alarm episodes raised and not cleared.", len(hub.alarms.active)
        )
        sensors = hub.sensors
        yield _gauge("sensors", "Sensors seen.", len(sensors))
        yield _gauge("history_frames", "Messages kept for resumes.", len(hub.history))
        predictions, anomalies = hub.evicted_predictions, hub.evicted_anomalies
        for s in sensors.values():
            predictions += s.count
            anomalies += s.anomalies
        yield _counter("predictions", "Predictions broadcast.", predictions)
        yield _counter("anomalies", "Predictions flagged as anomalies.", anomalies)
