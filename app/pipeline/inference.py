"""The model stage: worker processes that own shards of the sensors.

Each shard is a ``ProcessPoolExecutor`` with one process. The process keeps the models (and
so the windows) of the sensors hashed to it, so a batch carries only the new readings, never
per-sensor state; and since a shard runs one batch at a time, in order, per-sensor order holds.
Retraining runs in a separate trainer pool, so a slow fit never delays predictions.

The functions at the top run *inside* the worker processes: they are module-level, take and
return plain picklable values, and never touch the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import pickle
import select
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import (
    BrokenExecutor,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
)
from datetime import UTC, datetime
from typing import Any, NamedTuple, TypeVar

import msgspec
import numpy as np

from app.config import ExecutorKind
from app.models.base import ModelOptions, SensorModel, SensorModelClass, load_model_class
from app.schemas import Reading

log = logging.getLogger(__name__)

T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# Inside a worker process


class PredictionBody(msgspec.Struct, omit_defaults=True):
    """A prediction frame without its ``type``, ``seq`` and ``epoch``, added when published."""

    sensor_id: str
    id: str | None
    ts: datetime
    values: dict[str, float]
    forecast: dict[str, float] | None
    anomaly_score: float | None
    is_anomaly: bool
    status: str
    model_version: int
    ingested_at: datetime
    predicted_at: datetime
    reason: str | None = None


class Prediction(NamedTuple):
    sensor_id: str
    is_anomaly: bool
    body: bytes
    """JSON object of :class:`PredictionBody`."""


class Swap(NamedTuple):
    sensor_id: str
    model_version: int


class TrainingJob(NamedTuple):
    shard: int
    sensor_id: str
    model_version: int
    job: Any


class BatchResult(NamedTuple):
    predictions: list[Prediction]
    """One per reading, in the order the readings were given."""
    swaps: list[Swap]
    """Models installed before this batch was scored."""
    jobs: list[TrainingJob]
    """Sensors whose model asked to be refitted."""


_model_class: SensorModelClass | None = None
_model_path = ""
_options = ModelOptions()
_model_dir: str | None = None
_models: dict[str, SensorModel] = {}
_encoder = msgspec.json.Encoder()
_MAX_REASON_CHARS = 200


def init_worker(
    model_path: str,
    options: ModelOptions | None = None,
    model_dir: str | None = None,
    service_pid: int | None = None,
) -> None:
    """Pool initializer: load the model class once per process.

    Args:
        model_path: ``module:Class`` of the model.
        options: passed to every model instance.
        model_dir: where each sensor's model is saved after a retrain, or None.
        service_pid: the worker exits as soon as that process is gone, even when it was
            killed without a chance to shut the pool down: a worker never outlives its
            service.
    """
    global _model_class, _model_path, _options, _model_dir
    _model_class = load_model_class(model_path)
    _model_path = model_path
    _options = options or ModelOptions()
    _model_dir = model_dir
    _models.clear()
    if service_pid is not None:
        threading.Thread(
            target=_exit_with, args=(service_pid,), name="exit-with-service", daemon=True
        ).start()


def _exit_with(pid: int) -> None:
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        # No pidfd (old kernel or another OS): poll instead.
        while True:
            time.sleep(1.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(0)
    select.select([fd], [], [])
    os._exit(0)


def warm() -> int:
    """A no-op round trip used to start and check a worker; returns its pid."""
    return os.getpid()


def _model_for(sensor_id: str, channels: tuple[str, ...], resume: bool = False) -> SensorModel:
    model = _models.get(sensor_id)
    if model is None and resume and _model_dir is not None:
        # A sensor seen for the first time by this worker, or again after its eviction:
        # it carries on from its saved model, if it has one.
        model = _load_one(os.path.join(_model_dir, sensor_id + MODEL_SUFFIX), missing_ok=True)
    if model is not None and model.channels == channels:
        return model
    assert _model_class is not None, "init_worker was not called"
    fresh = _model_class(sensor_id, channels, _options)
    if model is not None:
        # A sensor whose channels change starts a new model; versions keep rising.
        fresh.version = model.version
    _models[sensor_id] = fresh
    return fresh


def _dt(ts: float, cache: dict[float, datetime]) -> datetime:
    value = cache.get(ts)
    if value is None:
        value = cache[ts] = datetime.fromtimestamp(ts, UTC)
    return value


def _aligned(reading: Reading, channels: tuple[str, ...]) -> tuple[float, ...]:
    if reading.channels == channels:
        return reading.values
    lookup = dict(zip(reading.channels, reading.values, strict=True))
    return tuple(lookup[name] for name in channels)


def _runs(readings: list[Reading], indices: list[int]) -> list[list[int]]:
    """Split one sensor's readings into runs with the same channel set."""
    first = readings[indices[0]].channels
    if all(readings[i].channels == first for i in indices):
        return [indices]
    runs: list[list[int]] = []
    current: frozenset[str] | None = None
    for i in indices:
        key = frozenset(readings[i].channels)
        if key != current:
            runs.append([])
            current = key
        runs[-1].append(i)
    return runs


def _observe(model: SensorModel, ts: np.ndarray, values: np.ndarray) -> list[Any]:
    """Rows of (forecast, score, is_anomaly) or an error reason, one per reading."""
    try:
        obs = model.observe(ts, values)
        return list(zip(_list(obs.forecast), _list(obs.score), _list(obs.is_anomaly), strict=True))
    except Exception:
        if len(ts) == 1:
            raise
    # Find the readings that fail on their own; the others are scored one by one.
    rows: list[Any] = []
    for k in range(len(ts)):
        try:
            obs = model.observe(ts[k : k + 1], values[k : k + 1])
            rows.append((obs.forecast[0].tolist(), float(obs.score[0]), bool(obs.is_anomaly[0])))
        except Exception as exc:
            rows.append(_reason(exc))
    return rows


def _list(column: Any) -> list[Any]:
    return column.tolist() if isinstance(column, np.ndarray) else list(column)


def _reason(exc: BaseException) -> str:
    text = f"model error: {type(exc).__name__}: {exc}"
    return text[:_MAX_REASON_CHARS]


def run_batch(
    readings: list[Reading], installs: list[tuple[str, Any]], replay: bool = False
) -> BatchResult:
    """Score a batch in this worker: install refitted models, then predict every reading.

    Runs in the shard's worker process. Readings of one sensor are scored in the order given.
    With ``replay`` (rebuilding a replaced worker's state) the models take the readings in
    but nothing is encoded and no training is asked for: those predictions were published.
    """
    swaps: list[Swap] = []
    for sensor_id, fitted in installs:
        model = _models.get(sensor_id)
        if model is not None and model.install(fitted):
            swaps.append(Swap(sensor_id, model.version))
            if _model_dir is not None:
                _save_one(sensor_id, model)

    by_sensor: dict[str, list[int]] = {}
    for i, r in enumerate(readings):
        by_sensor.setdefault(r.sensor_id, []).append(i)

    rows: list[Any] = [None] * len(readings)
    versions: list[int] = [0] * len(readings)
    channels_of: list[tuple[str, ...]] = [()] * len(readings)
    jobs: list[TrainingJob] = []
    now = time.time()
    for sensor_id, indices in by_sensor.items():
        for run in _runs(readings, indices):
            channels = readings[run[0]].channels
            model = _model_for(sensor_id, channels, resume=not replay)
            ts = np.array([readings[i].ts for i in run], dtype=np.float64)
            if channels == model.channels:
                values = np.array([readings[i].values for i in run], dtype=np.float64)
            else:
                values = np.array(
                    [_aligned(readings[i], model.channels) for i in run], dtype=np.float64
                )
            try:
                scored = _observe(model, ts, values)
            except Exception as exc:
                scored = [_reason(exc)]
            for i, row in zip(run, scored, strict=True):
                rows[i] = row
                versions[i] = model.version
                channels_of[i] = model.channels
        if replay:
            continue
        try:
            job = _models[sensor_id].training_job(now)
        except Exception:
            job = None
        if job is not None:
            jobs.append(TrainingJob(-1, sensor_id, _models[sensor_id].version, job))

    if replay:
        return BatchResult([], swaps, [])
    predicted_at = datetime.now(UTC)
    stamps: dict[float, datetime] = {}
    predictions: list[Prediction] = []
    for i, r in enumerate(readings):
        row = rows[i]
        channels = channels_of[i]
        values_out = dict(zip(r.channels, r.values, strict=True))
        if isinstance(row, str):
            body = PredictionBody(
                r.sensor_id, r.id, _dt(r.ts, stamps), values_out, None, None, False,
                "error", versions[i], _dt(r.ingested_at, stamps), predicted_at, row,
            )  # fmt: skip
            anomaly = False
        else:
            forecast, score, anomaly = row
            if score != score:  # NaN: still warming up
                body = PredictionBody(
                    r.sensor_id, r.id, _dt(r.ts, stamps), values_out, None, None, False,
                    "warming_up", versions[i], _dt(r.ingested_at, stamps), predicted_at,
                )  # fmt: skip
                anomaly = False
            else:
                body = PredictionBody(
                    r.sensor_id, r.id, _dt(r.ts, stamps), values_out,
                    dict(zip(channels, forecast, strict=True)), score, anomaly,
                    "ok", versions[i], _dt(r.ingested_at, stamps), predicted_at,
                )  # fmt: skip
        predictions.append(Prediction(r.sensor_id, anomaly, _encoder.encode(body)))
    return BatchResult(predictions, swaps, jobs)


_fit_classes: dict[str, SensorModelClass] = {}


def fit_job(model_path: str, job: Any) -> Any:
    """Run a model's ``fit`` in a trainer process."""
    cls = _fit_classes.get(model_path)
    if cls is None:
        cls = _fit_classes[model_path] = load_model_class(model_path)
    return cls.fit(job)


# Persistence: one file per sensor, ``<model_dir>/<sensor_id>.model``, written atomically by
# the worker that owns the sensor (sensor ids never contain "/", so they are safe file names).

MODEL_SUFFIX = ".model"
_FORMAT = 1


def _save_one(sensor_id: str, model: SensorModel) -> bool:
    assert _model_dir is not None
    record = {
        "format": _FORMAT,
        "model": _model_path,
        "sensor_id": sensor_id,
        "channels": model.channels,
        "version": model.version,
        "state": model.state(),
    }
    path = os.path.join(_model_dir, sensor_id + MODEL_SUFFIX)
    temp = os.path.join(_model_dir, f".{sensor_id}.{os.getpid()}.tmp")
    try:
        with open(temp, "wb") as f:
            pickle.dump(record, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(temp, path)
    except Exception:
        log.exception("cannot save the model of sensor %s", sensor_id)
        return False
    return True


def save_states() -> int:
    """Save every model of this worker to the model directory; returns how many."""
    if _model_dir is None:
        return 0
    os.makedirs(_model_dir, exist_ok=True)
    return sum(_save_one(sensor_id, model) for sensor_id, model in _models.items())


def load_states(paths: list[str]) -> int:
    """Load models saved by :func:`save_states`; returns how many were restored.

    A file made by another model class, or that does not load, is skipped with a warning:
    that sensor starts warming up again.
    """
    return sum(_load_one(path) is not None for path in paths)


def _load_one(path: str, missing_ok: bool = False) -> SensorModel | None:
    try:
        with open(path, "rb") as f:
            record = pickle.load(f)
    except FileNotFoundError:
        if not missing_ok:
            log.warning("%s is gone; that sensor warms up again", path)
        return None
    except Exception:
        log.exception("cannot load the model in %s; that sensor warms up again", path)
        return None
    try:
        if record.get("format") != _FORMAT or record.get("model") != _model_path:
            log.warning("%s was saved by another model (%s); ignored", path, record["model"])
            return None
        model = _model_for(record["sensor_id"], tuple(record["channels"]))
        model.restore(record["state"])
        model.version = record["version"]
    except Exception:
        log.exception("cannot load the model in %s; that sensor warms up again", path)
        return None
    return model


def export_states() -> dict[str, tuple[tuple[str, ...], Any]]:
    """Every model of this worker as ``{sensor_id: (channels, state)}``."""
    return {sid: (m.channels, m.state()) for sid, m in _models.items()}


def export_partition_states(
    partition: int, partitions: int
) -> dict[str, tuple[tuple[str, ...], Any]]:
    """The models of one Redis partition's sensors (see ``app/backends/redis.py``)."""
    return {
        sid: (m.channels, m.state())
        for sid, m in _models.items()
        if zlib.crc32(sid.encode()) % partitions == partition
    }


def drop_partition(partition: int, partitions: int) -> int:
    """Forget the models of a partition this worker no longer owns; returns how many."""
    gone = [sid for sid in _models if zlib.crc32(sid.encode()) % partitions == partition]
    for sid in gone:
        del _models[sid]
    return len(gone)


def evict_sensors(sensor_ids: list[str]) -> int:
    """Forget idle sensors' models, each saved to the model directory first when one is
    set (so a returning sensor resumes from it); returns how many this worker had."""
    evicted = 0
    for sid in sensor_ids:
        model = _models.get(sid)
        if model is None:
            continue
        if _model_dir is not None:
            _save_one(sid, model)
        del _models[sid]
        evicted += 1
    return evicted


def import_states(states: dict[str, tuple[tuple[str, ...], Any]]) -> int:
    """Restore models saved by :func:`export_states`; returns how many."""
    for sensor_id, (channels, state) in states.items():
        _model_for(sensor_id, channels).restore(state)
    return len(states)


# ---------------------------------------------------------------------------------------------
# In the service process


def _mp_context() -> multiprocessing.context.BaseContext:
    # forkserver: workers never inherit the event loop's threads or sockets, and the model
    # libraries are imported once in the server process instead of once per worker.
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["app.pipeline.inference", "sklearn.linear_model"])
        return ctx
    return multiprocessing.get_context("spawn")


class ShardPool:
    """One single-process executor per shard, plus a trainer pool.

    ``start()`` creates the processes and waits until each has imported the model code, so
    readiness only says yes once work can really run. A shard whose process dies is rebuilt
    by :meth:`rebuild`; each rebuild bumps the shard's ``generation`` so callers can tell a
    future of the dead process from one of its successor.
    """

    def __init__(
        self,
        shards: int,
        trainers: int,
        model_path: str,
        start_timeout_s: float,
        kind: ExecutorKind = ExecutorKind.process,
        options: ModelOptions | None = None,
        model_dir: str | None = None,
    ) -> None:
        self.size = shards
        self._options = options or ModelOptions()
        self._model_dir = model_dir
        self.kind = kind
        self._trainers = trainers
        self._model_path = model_path
        self._start_timeout_s = start_timeout_s
        self._executors: list[Executor] = []
        self._trainer: Executor | None = None
        self.generation = [0] * shards
        self.healthy = [False] * shards
        self.pids: list[int | None] = [None] * shards
        self.trainer_pids: list[int] = []
        self.rebuilds = 0
        self._started = False
        self._training: set[asyncio.Task[None]] = set()

    @property
    def ready(self) -> bool:
        """True when every shard and the trainer pool can take work."""
        return self._started and all(self.healthy)

    def _executor(self, workers: int) -> Executor:
        if self.kind is ExecutorKind.process:
            return ProcessPoolExecutor(
                max_workers=workers,
                mp_context=_mp_context(),
                initializer=init_worker,
                initargs=(self._model_path, self._options, self._model_dir, os.getpid()),
            )
        # Benchmarks only: every shard shares this process's module state, which is safe
        # because shards own disjoint sensors.
        if _model_class is None:
            init_worker(self._model_path, self._options, self._model_dir)
        if self.kind is ExecutorKind.thread:
            return ThreadPoolExecutor(max_workers=workers)
        return _InlineExecutor()

    async def start(self) -> None:
        if self._started:
            return
        started = time.perf_counter()
        self._executors = [self._executor(1) for _ in range(self.size)]
        self._trainer = self._executor(self._trainers)
        await asyncio.wait_for(
            asyncio.gather(
                *(self._warm_shard(shard) for shard in range(self.size)), self._warm_trainer()
            ),
            self._start_timeout_s,
        )
        self._started = True
        log.info(
            "process pool ready: %d shard workers, %d trainers, in %.2f s",
            self.size, self._trainers, time.perf_counter() - started,
        )  # fmt: skip

    async def _warm_shard(self, shard: int) -> None:
        loop = asyncio.get_running_loop()
        self.pids[shard] = await loop.run_in_executor(self._executors[shard], warm)
        self.healthy[shard] = True

    async def _warm_trainer(self) -> None:
        assert self._trainer is not None
        loop = asyncio.get_running_loop()
        pids = await asyncio.gather(
            *(loop.run_in_executor(self._trainer, warm) for _ in range(self._trainers))
        )
        self.trainer_pids = sorted(set(pids))

    async def rebuild(self, shard: int) -> None:
        """Replace a shard's (dead) process with a fresh, warmed one. Its models start empty."""
        self.healthy[shard] = False
        started = time.perf_counter()
        old = self._executors[shard]
        old.shutdown(wait=False, cancel_futures=True)
        self._executors[shard] = self._executor(1)
        self.generation[shard] += 1
        self.rebuilds += 1
        await asyncio.wait_for(self._warm_shard(shard), self._start_timeout_s)
        log.warning(
            "shard %d: worker process replaced (pid %s) in %.2f s",
            shard, self.pids[shard], time.perf_counter() - started,
        )  # fmt: skip

    def train(self, job: TrainingJob, deliver: Callable[[Any], None]) -> None:
        """Fit ``job`` in the trainer pool in the background, then call ``deliver`` with the
        result, or with None when the fit failed (the sensor keeps its model)."""
        task = asyncio.create_task(self._train(job, deliver), name=f"fit-{job.sensor_id}")
        self._training.add(task)
        task.add_done_callback(self._training.discard)

    async def _train(self, job: TrainingJob, deliver: Callable[[Any], None]) -> None:
        try:
            fitted = await self.fit(job.job)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("retraining sensor %s failed; keeping its model", job.sensor_id)
            fitted = None
        deliver(fitted)

    async def cancel_training(self) -> None:
        """Drop the fits still running; their sensors keep their models."""
        for task in self._training:
            task.cancel()
        await asyncio.gather(*self._training, return_exceptions=True)

    async def stop(self) -> None:
        await self.cancel_training()
        self._started = False
        self.healthy = [False] * self.size
        executors, self._executors = self._executors, []
        if self._trainer is not None:
            executors.append(self._trainer)
            self._trainer = None
        for ex in executors:
            ex.shutdown(wait=False, cancel_futures=True)
        # Join the processes off the loop so shutdown never blocks it.
        await asyncio.gather(*(asyncio.to_thread(ex.shutdown, True) for ex in executors))

    async def __aenter__(self) -> ShardPool:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def submit(self, shard: int, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue a call on a shard's worker; calls on one shard run in submission order.

        A call on a broken shard returns a future that fails with ``BrokenExecutor`` rather
        than raising here, so every failure reaches the caller the same way.
        """
        loop = asyncio.get_running_loop()
        try:
            return loop.run_in_executor(self._executors[shard], fn, *args)
        except BrokenExecutor as exc:
            failed: asyncio.Future[T] = loop.create_future()
            failed.set_exception(exc)
            return failed

    def run_batch(
        self, shard: int, readings: list[Reading], installs: list[tuple[str, Any]]
    ) -> asyncio.Future[BatchResult]:
        """Queue a batch on a shard's worker. Batches of one shard run in submission order."""
        return self.submit(shard, run_batch, readings, installs)

    async def fit(self, job: Any) -> Any:
        """Run a training job in the trainer pool; a dead trainer is replaced once."""
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            trainer = self._trainer
            assert trainer is not None
            try:
                return await loop.run_in_executor(trainer, fit_job, self._model_path, job)
            except BrokenExecutor:
                if attempt:
                    raise
                if self._trainer is trainer:
                    log.warning("trainer pool broken; replacing it")
                    trainer.shutdown(wait=False, cancel_futures=True)
                    self._trainer = self._executor(self._trainers)
                    await self._warm_trainer()
        raise AssertionError("unreachable")

    async def save_states(self, shard: int) -> int:
        """Have a shard's worker save its models to the model directory."""
        return await self.submit(shard, save_states)

    async def load_states(self, shard: int, paths: list[str]) -> int:
        """Have a shard's worker load the saved models of its sensors."""
        return await self.submit(shard, load_states, paths)

    async def export_states(self, shard: int) -> dict[str, tuple[tuple[str, ...], Any]]:
        return await self.submit(shard, export_states)

    async def import_states(
        self, shard: int, states: dict[str, tuple[tuple[str, ...], Any]]
    ) -> int:
        return await self.submit(shard, import_states, states)


class _InlineExecutor(Executor):
    """Runs each call at once on the calling thread: the event loop blocks for its duration.

    Exists only so the benchmarks can measure what offloading saves.
    """

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future
