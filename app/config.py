"""Settings: every option of ``sensorcast serve`` / ``sensorcast worker``.

Each field can come from the command line or from the environment as ``SENSORCAST_<NAME>``
(for example ``SENSORCAST_WORKERS=4``). Names carry their unit (``_ms``, ``_s``, ``_bytes``).
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.backends import TOPOLOGIES, topology_of
from app.models.alarms import AlarmOptions
from app.models.base import ModelOptions
from app.scheduling import MAX_SLICE_US, MIN_SLICE_US

if TYPE_CHECKING:
    from app.pipeline.runner import ProcessSpec


class SlowClientPolicy(StrEnum):
    """What happens to a subscriber whose send queue is full."""

    drop_oldest = "drop_oldest"
    """Drop the oldest queued frames and tell the client with a ``lagged`` frame."""
    latest_per_sensor = "latest_per_sensor"
    """Keep only the newest prediction of each sensor (conflation)."""
    disconnect = "disconnect"
    """Close the connection with code 1013 (try again later)."""


def _default_workers() -> int:
    return max(1, os.cpu_count() or 1)


class LogFormat(StrEnum):
    """How log lines are written."""

    text = "text"
    json = "json"


class ExecutorKind(StrEnum):
    """Where the model work runs. Only ``process`` keeps the event loop free; the others
    exist so the benchmarks can show the difference side by side."""

    process = "process"
    thread = "thread"
    inline = "inline"


class Settings(BaseSettings):
    """Service settings, validated once at start-up."""

    model_config = SettingsConfigDict(env_prefix="SENSORCAST_", extra="ignore")

    # Serving
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    backend: str = "memory://"
    log_level: str = "info"
    log_format: LogFormat = LogFormat.text
    """``text`` (readable lines) or ``json`` (one object per line, for log collectors)."""
    access_log: bool = True
    """One line per HTTP request and WebSocket connection, at INFO."""

    # Compute
    workers: int = Field(default_factory=_default_workers, ge=1, le=256)
    """Model worker processes (one shard of the sensors each)."""
    model_nice: int = Field(10, ge=0, le=19)
    """Added to the model processes' scheduling niceness: on a saturated machine the event
    loop gets a core before the model work does, so the service stays responsive."""
    worker_nice: int = Field(5, ge=0, le=19)
    """Added to a ``sensorcast worker``'s scheduling niceness at start (its model processes
    add ``model_nice`` to it): on a machine it shares with API replicas, their event loops
    get a core before its own does."""
    loop_slice_us: int = Field(100, ge=0, le=MAX_SLICE_US)
    """The scheduler time slice the event loop's thread asks for, in µs (Linux 6.12 and
    later; 0 leaves the kernel's default, 100 is the shortest it takes): woken by a timer
    or a socket, a thread with a short slice takes a core from threads running longer
    slices (model processes, other programs) at once. Its share of the CPU is unchanged.
    See ``app/scheduling.py``."""
    executor: ExecutorKind = ExecutorKind.process
    """Benchmarks only: ``thread`` or ``inline`` run the model work in the service process."""
    model: str = "app.models.ridge:RidgeForecaster"
    """The model class, as ``module:Class``."""
    model_dir: Path | None = None
    """Where models and their windows are saved (at shutdown) and loaded at start; None keeps
    them in memory only."""
    model_history_readings: int = Field(512, ge=32, le=100_000)
    """Readings kept per sensor to refit its model on."""
    model_warmup_readings: int = Field(48, ge=2, le=100_000)
    """Readings a sensor needs before its first fit (predictions are ``warming_up`` until)."""
    retrain_every_readings: int = Field(2_000, ge=1)
    retrain_interval_s: float = Field(86_400.0, gt=0)
    """A sensor's model is also refitted after this much event time (its readings' ``ts``),
    if it had new readings."""
    # Alarms
    alarm_raise_count: int = Field(3, ge=1, le=1000)
    """Anomalies among a sensor's last ``alarm_raise_window`` readings that raise an alarm."""
    alarm_raise_window: int = Field(6, ge=1, le=1000)
    alarm_clear_count: int = Field(10, ge=1, le=100_000)
    """Normal readings in a row that clear an alarm."""
    alarm_hold_score: float = Field(0.2, ge=0, le=1)
    """While an alarm is raised, a reading scoring at least this keeps it raised."""
    alarm_flap_window: int = Field(288, ge=0)
    """Readings after a clear within which a new alarm reopens the same episode (288: a day
    of 5-minute readings)."""
    alarm_max_readings: int = Field(720, ge=0)
    """Readings an alarm may stay raised before the fault is declared the sensor's new normal
    (0: never)."""

    # Scale-out on Redis
    partitions: int = Field(16, ge=1, le=4096)
    """Redis streams the readings are spread over; a sensor always goes to the same one.
    Every API replica and worker must agree on it."""
    lease_ttl_s: float = Field(5.0, gt=0.1)
    """How long a dead worker's partitions wait before another worker takes them over."""
    redis_timeout_s: float = Field(2.0, gt=0)
    """Bound on a Redis call: past it, POST answers 503 and /readyz says not ready."""
    redis_min_replicas: int = Field(0, ge=0, le=16)
    """Replicas that must hold a request's readings before it is answered 202 (``WAIT``);
    a worker's published predictions wait for them too. 0: the primary alone."""
    redis_replica_timeout_ms: int = Field(500, ge=1, le=60_000)
    """How long a write waits for ``redis_min_replicas`` replicas; past it, POST answers 503
    with Retry-After (the readings may be retried: their ids make the retry safe)."""

    # Pipeline
    queue_max_readings: int = Field(TOPOLOGIES["memory"].queue_max_readings, ge=1)
    """Readings accepted but not yet predicted, per shard; beyond it POST answers 503 (after
    waiting up to ``admission_wait_ms`` for room, where that is set). A few seconds of model
    work (the model stage takes tens of thousands of readings a second per shard): more than
    the 1 s a refused client waits (``Retry-After``), so the model processes do not run dry
    while it does, and packed (about 50 bytes a reading) it costs little memory. A larger
    queue only makes predictions later under overload. On Redis it bounds each partition's
    stream instead, and its default is the Redis topologies' (25,000: ``partitions`` streams
    of it already hold seconds of work; see ``app.backends.TOPOLOGIES``)."""
    admission_wait_ms: float = Field(0.0, ge=0, le=60_000)
    """How long a request that finds the shard queues full waits for room before it is
    refused with 503 (behind the requests that waited before it); 0, the default, refuses at
    once. Worth raising where a queue drains in under the 1 s of ``Retry-After``, so refused
    clients would leave the model processes idle (see the README). Memory backend only: the
    Redis admission answers at once."""
    batch_max_size: int = Field(2_000, ge=1)
    """Readings a batch holds: whole request shares up to this many (one share larger than
    it goes alone), in both topologies."""
    batch_window_ms: float = Field(2.0, ge=0)
    """How long the batcher waits for more readings before sending a partial batch."""
    batches_in_flight: int = Field(2, ge=1, le=16)
    """Batches a shard may have queued in its worker at once (pipelining)."""
    checkpoint_interval_s: float = Field(5.0, gt=0)
    """How often each model process's models are checkpointed by the process that drives it
    (the service, or a Redis worker), so a process that dies can be rebuilt exactly (the
    batches since are replayed). A Redis worker also saves each partition's models to Redis
    at this interval, for another worker to take over."""
    checkpoint_max_readings: int = Field(200_000, ge=1)
    """Checkpoint sooner when this many readings went through a process since the last one."""
    publish_max_pending_messages: int = Field(50_000, ge=1)
    """Messages published and not yet taken in by the hub (memory backend); beyond it the
    model stage waits, the shard queues fill and POST answers 503."""
    metrics_port: int | None = Field(None, ge=0, le=65535)
    """``sensorcast worker``: serve ``/metrics`` and ``/healthz`` on this port."""
    dedup_window_s: float = Field(600.0, ge=0)
    dedup_max_ids: int = Field(1_000_000, ge=0)
    max_sensors: int = Field(50_000, ge=1)
    """Sensors the service keeps state for at once; readings of a new sensor beyond it are
    refused (507), the whole request with them."""
    sensor_idle_evict_s: float = Field(86_400.0, ge=0)
    """A sensor without readings for this long is forgotten (its model saved first where a
    model dir is set, or in Redis by a worker, so it resumes when it returns); 0 never evicts."""

    # Request limits
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_readings_per_request: int = Field(10_000, ge=1)
    max_pending_body_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    """Request bodies held in memory at once (being received or parsed); beyond it, 503."""
    max_channels: int = Field(32, ge=1, le=32)
    """Named values per reading (``values``); the contract's ceiling is 32."""
    max_sensor_id_chars: int = Field(128, ge=1, le=128)
    max_reading_id_chars: int = Field(128, ge=1, le=128)

    # Edge: connections, headers, bodies, hosts
    max_connections: int | None = Field(None, ge=1)
    """Open connections (HTTP and WebSocket) at once; beyond it, 503. None: sized from the
    open-file limit (see :func:`app.edge.open_file_limit`)."""
    max_subscribers: int | None = Field(None, ge=1)
    """WebSocket subscribers at once; beyond it, the handshake gets 503. None: half of
    ``max_connections``."""
    max_subscribers_per_key: int | None = Field(None, ge=1)
    """Subscribers one API key may hold at once, where keys are set. None: no bound apart
    from ``max_subscribers``."""
    header_timeout_s: float = Field(10.0, gt=0)
    """A request's line and headers must arrive within this long of its first byte (or of
    the connection, for the first request); else 408 and the connection is closed."""
    max_header_bytes: int = Field(16 * 1024, ge=1024)
    """Request line and headers; beyond it, 431 and the connection is closed."""
    max_headers: int = Field(100, ge=8)
    """Header fields per request; beyond it, 431."""
    body_timeout_s: float = Field(10.0, gt=0)
    """Time a body may take on top of its size at ``body_min_bytes_per_s``; past it, 408 and
    the connection is closed (what it held of ``max_pending_body_bytes`` is given back)."""
    body_min_bytes_per_s: int = Field(100 * 1024, ge=1)
    keep_alive_timeout_s: float = Field(5.0, gt=0)
    """An idle keep-alive connection is closed after this long."""
    trusted_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """``Host`` names served (``*.example.com`` for subdomains, ``*`` any). Empty: loopback
    names only when bound to a loopback address, any name otherwise."""

    # Subscriptions
    history_max_frames: int = Field(100_000, ge=0)
    history_max_bytes: int = Field(32 * 2**20, ge=0)
    """Memory the messages kept for resumes may take (their JSON text plus the bookkeeping of
    each), besides their count: frames of many-channel sensors with explanations are larger,
    and memory must stay bounded."""
    history_max_age_s: float = Field(3600.0, ge=0)
    subscriber_queue_frames: int = Field(10_000, ge=1)
    slow_client_policy: SlowClientPolicy = SlowClientPolicy.drop_oldest
    ws_ping_interval_s: float = Field(20.0, gt=0)
    ws_ping_timeout_s: float = Field(20.0, gt=0)
    ws_stall_timeout_s: float = Field(5.0, gt=0)
    """A subscriber whose socket takes nothing for this long (its send buffers full) is
    closed with 1013 and the ``since`` to resume from, and its socket aborted soon after."""
    ws_send_buffer_bytes: int = Field(32 * 1024, ge=4096)
    """Bytes a subscriber's socket may hold unsent, in the kernel (``TCP_NOTSENT_LOWAT``)
    and in the service's transport each: what a peer that reads nothing costs to fill."""
    ws_max_message_bytes: int = Field(64 * 1024, ge=1024)

    # Access
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)
    """``KEY[:SCOPE+SCOPE]`` entries, comma-separated; see ``app/api/auth.py``."""
    api_keys_file: Path | None = None
    """More keys, one entry per line."""
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """Browser origins allowed to open the WebSocket, besides the service's own; ``*`` any."""
    rate_limit_per_s: float = Field(0.0, ge=0)
    """Requests per second per API key (0: no limit); beyond it, 429."""
    rate_limit_burst: int = Field(20, ge=1)

    # Lifecycle
    shutdown_timeout_s: float = Field(30.0, ge=0)
    pool_start_timeout_s: float = Field(60.0, gt=0)

    @field_validator("api_keys", "allowed_origins", "trusted_hosts", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("loop_slice_us")
    @classmethod
    def _check_loop_slice(cls, value: int) -> int:
        if 0 < value < MIN_SLICE_US:
            raise ValueError(f"0 (the kernel's default) or {MIN_SLICE_US} to {MAX_SLICE_US} µs")
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: list[str]) -> list[str]:
        from app.access import parse_key_entry

        for number, entry in enumerate(value, start=1):
            try:
                parse_key_entry(entry)
            except ValueError as exc:
                # Name the entry by position: the message must never repeat a key.
                raise ValueError(f"entry {number}: {exc}") from None
        return value

    @field_validator("api_keys_file")
    @classmethod
    def _check_api_keys_file(cls, value: Path | None) -> Path | None:
        from app.access import read_keys_file

        if value is not None:
            read_keys_file(value)
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _check_origins(cls, value: list[str]) -> list[str]:
        from app.access import normalise_origin

        for origin in value:
            if origin != "*":
                normalise_origin(origin)
        return value

    @field_validator("max_pending_body_bytes")
    @classmethod
    def _check_pending_bodies(cls, value: int, info: ValidationInfo) -> int:
        largest = info.data.get("max_body_bytes")
        if largest is not None and value < largest:
            raise ValueError(f"must be at least max_body_bytes ({largest})")
        return value

    @field_validator("trusted_hosts")
    @classmethod
    def _check_hosts(cls, value: list[str]) -> list[str]:
        from app.api.hosts import check_host_pattern

        return [check_host_pattern(pattern) for pattern in value]

    @field_validator("backend")
    @classmethod
    def _check_backend(cls, value: str) -> str:
        from app.backends import load, topology_of

        topology = topology_of(value)
        if value.startswith("redis+sentinel://"):
            load("app.backends.redis:sentinel_address", topology.extra)(value)
        return value

    @model_validator(mode="after")
    def _topology_defaults(self) -> Settings:
        if "queue_max_readings" not in self.model_fields_set:
            self.queue_max_readings = topology_of(self.backend).queue_max_readings
        return self

    def model_options(self) -> ModelOptions:
        """The options every model instance is built with."""
        return ModelOptions(
            history_readings=self.model_history_readings,
            warmup_readings=self.model_warmup_readings,
            retrain_every_readings=self.retrain_every_readings,
            retrain_interval_s=self.retrain_interval_s,
            alarms=AlarmOptions(
                raise_count=self.alarm_raise_count,
                raise_window=self.alarm_raise_window,
                clear_count=self.alarm_clear_count,
                hold_score=self.alarm_hold_score,
                flap_window=self.alarm_flap_window,
                max_readings=self.alarm_max_readings,
            ),
        )

    def process_spec(self) -> ProcessSpec:
        """How the model processes are made (both topologies)."""
        from app.pipeline.runner import ProcessSpec

        return ProcessSpec(
            self.model,
            self.model_options(),
            None if self.model_dir is None else str(self.model_dir),
            self.model_nice,
            self.executor,
            self.pool_start_timeout_s,
        )

    @field_validator("model")
    @classmethod
    def _check_model_path(cls, value: str) -> str:
        module, sep, name = value.partition(":")
        if not sep or not module or not name:
            raise ValueError(f"{value!r} is not of the form module:Class")
        return value


def describe_error(error: ValidationError) -> str:
    """One line naming each bad setting, for start-up failures.

    Examples:
        >>> try:
        ...     Settings(workers=0)
        ... except ValidationError as e:
        ...     print(describe_error(e))
        SENSORCAST_WORKERS: Input should be greater than or equal to 1
    """
    parts = []
    for item in error.errors():
        name = "_".join(str(p) for p in item["loc"] if isinstance(p, str)) or "settings"
        message = item["msg"].removeprefix("Value error, ")
        parts.append(f"SENSORCAST_{name.upper()}: {message}")
    return "; ".join(parts)
