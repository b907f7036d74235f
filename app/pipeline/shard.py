"""Inside a model process: the models of one shard's sensors, and what runs on a batch.

Everything here runs in the process a :class:`~app.pipeline.runner.ShardRunner` drives: the
functions are module-level, take and return blobs and plain values, and never touch an event
loop. The process keeps the models (and so the windows) of the sensors hashed to it, so a
batch carries only new readings, never per-sensor state; it runs one call at a time, in the
order they were queued, so per-sensor order holds. Models refit inline (see
``app/models/base.py``), so what a model process holds depends only on the readings it was
given, in order: a checkpoint plus a replay of the batches since rebuilds it exactly.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import select
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from itertools import repeat
from typing import Any, cast

import numpy as np

from app.malloc import fix_mmap_threshold
from app.models.alarms import AlarmTracker, Explanation
from app.models.base import (
    ListObserver,
    ModelOptions,
    SensorModel,
    SensorModelClass,
    load_model_class,
    takes_lists,
)
from app.pipeline import wire
from app.pipeline.routing import shard_of
from app.schemas import Reading

log = logging.getLogger(__name__)

_model_class: SensorModelClass | None = None
_model_path = ""
_options = ModelOptions()
_model_dir: str | None = None
_models: dict[str, SensorModel] = {}
_trackers: dict[str, AlarmTracker] = {}
"""Alarm trackers of the sensors whose model tracks no alarms itself."""
_takes_lists = False
"""The model class scores plain lists: ``observe_lists`` is called instead of ``observe``."""
_MAX_REASON_CHARS = 200
MODEL_SUFFIX = ".model"
_FORMAT = 2
GC_YOUNG_THRESHOLD = 20_000
"""Allocations of containers between two collections of the youngest generation (Python's
default is 700). Reference counting frees what a batch makes (it makes no cycles), and each
collection that reaches the oldest generation walks every model's state; collected this
rarely, the collector's share of a model process fell from about 6 % to under 1 %."""


def init_process(
    model_path: str,
    options: ModelOptions | None = None,
    model_dir: str | None = None,
    service_pid: int | None = None,
    nice: int = 0,
) -> None:
    """Executor initializer: load the model class once per process.

    Args:
        model_path: ``module:Class`` of the model.
        options: passed to every model instance.
        model_dir: where each sensor's model is saved (at shutdown) and loaded from, or None.
        service_pid: the process exits as soon as that process is gone, even when it was
            killed without a chance to shut the pool down: a model process never outlives
            its service.
        nice: added to the process's scheduling niceness, so that on a busy machine the
            service's event loop gets a core before the model work does.
    """
    global _model_class, _model_path, _options, _model_dir, _takes_lists
    fix_mmap_threshold()  # checkpoints of every model are built and freed here too
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    _model_class = load_model_class(model_path)
    _takes_lists = takes_lists(_model_class)
    _model_path = model_path
    _options = options or ModelOptions()
    _model_dir = model_dir
    _models.clear()
    _trackers.clear()
    if nice:
        try:
            os.nice(nice)
        except OSError:
            log.warning("cannot lower the model process's priority by %d", nice)
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
    """A no-op round trip used to start and check a process; returns its pid."""
    return os.getpid()


def _model_for(sensor_id: str, channels: tuple[str, ...], resume: bool = False) -> SensorModel:
    model = _models.get(sensor_id)
    if model is None and resume and _model_dir is not None:
        # A sensor seen for the first time by this process, or again after its eviction:
        # it carries on from its saved model, if it has one.
        model = _load_one(os.path.join(_model_dir, sensor_id + MODEL_SUFFIX), missing_ok=True)
    if model is not None and model.channels == channels:
        return model
    assert _model_class is not None, "init_process was not called"
    fresh = _model_class(sensor_id, channels, _options)
    if model is not None:
        # A sensor whose channels change starts a new model; versions keep rising.
        fresh.version = model.version
    _models[sensor_id] = fresh
    return fresh


def _aligned(reading: Reading, channels: tuple[str, ...]) -> tuple[float, ...]:
    if reading.channels == channels:
        return reading.values
    lookup = dict(zip(reading.channels, reading.values, strict=True))
    return tuple(lookup[name] for name in channels)


def _runs(readings: list[Reading], indices: list[int]) -> list[list[int]]:
    """Split one sensor's readings into runs with the same channel set."""
    first = readings[indices[0]].channels
    for i in indices:
        if readings[i].channels != first:
            break
    else:
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


_Out = tuple[Any, float, bool, Explanation, "Sequence[Any] | None", int]
"""What the model said of one reading: (forecast, score, flag, explanation, the alarm events
it tracked or None, version that scored it)."""


def _observe(
    model: SensorModel, observe: Callable[[Any, Any], Any], ts: Any, values: Any
) -> list[Any]:
    """One :data:`_Out` per reading, or an error reason (a str) for a reading that fails.

    ``observe`` is the model's ``observe`` (``ts`` and ``values`` arrays) or
    ``observe_lists`` (plain lists).
    """
    try:
        return _rows(model, observe(ts, values), len(ts))
    except Exception:
        if len(ts) == 1:
            raise
    # Find the readings that fail on their own; the others are scored one by one.
    rows: list[Any] = []
    for k in range(len(ts)):
        try:
            rows.extend(_rows(model, observe(ts[k : k + 1], values[k : k + 1]), 1))
        except Exception as exc:
            rows.append(_reason(exc))
    return rows


def _rows(model: SensorModel, obs: Any, k: int) -> list[_Out]:
    explanation = obs.explanation if obs.explanation is not None else repeat((), k)
    versions = obs.versions if obs.versions is not None else repeat(model.version, k)
    alarms: Any = repeat(None, k)
    if obs.alarms is not None:
        alarms = [()] * k
        for row, event in obs.alarms:
            alarms[row] = (*alarms[row], event)
    return list(
        zip(
            _list(obs.forecast),
            _list(obs.score),
            _list(obs.is_anomaly),
            explanation,
            alarms,
            versions,
            strict=True,
        )  # fmt: skip
    )


def _list(column: Any) -> Any:
    """A column of an :class:`Observation` as a sequence of Python values."""
    return column.tolist() if isinstance(column, np.ndarray) else column


def _reason(exc: BaseException) -> str:
    text = f"model error: {type(exc).__name__}: {exc}"
    return text[:_MAX_REASON_CHARS]


def run_batch(blob: bytes, replay: bool = False) -> wire.BatchOutcome:
    """Score a batch of readings (packed by :func:`wire.encode_readings`) in this process.

    Readings of one sensor are scored in the order given. With ``replay`` (rebuilding a
    replaced process's state) the models take the readings in but nothing is encoded: those
    predictions were published.
    """
    readings = wire.decode_readings(blob)
    by_sensor: dict[str, list[int]] = {}
    for i, r in enumerate(readings):
        group = by_sensor.get(r.sensor_id)
        if group is None:
            by_sensor[r.sensor_id] = [i]
        else:
            group.append(i)

    # By reading: its prediction message, in the batch's order; a model frame for a fit the
    # model did not place (it reports no per-row versions); the model and alarm messages it
    # caused, published right after it.
    said: list[Any] = [None] * len(readings)
    before: dict[int, list[wire.Body]] = {}
    after: dict[int, list[wire.Body]] = {}
    swaps: list[tuple[str, int]] = []
    fit_seconds: list[float] = []
    fit_failures = 0
    raised = cleared = anomalies = 0
    stamps = wire.Stamps()
    prediction_body = wire.prediction_body
    for sensor_id, indices in by_sensor.items():
        for run in _runs(readings, indices):
            channels = readings[run[0]].channels
            model = _model_for(sensor_id, channels, resume=not replay)
            ts: Any = [readings[i].ts for i in run]
            if channels == model.channels:
                rows = [readings[i].values for i in run]
            else:
                rows = [_aligned(readings[i], model.channels) for i in run]
            observe: Callable[[Any, Any], Any]
            values: Any
            if _takes_lists:
                observe = cast(ListObserver, model).observe_lists
                values = rows
            else:
                observe = model.observe
                ts, values = np.array(ts, dtype=np.float64), np.array(rows, dtype=np.float64)
            version = model.version
            names = model.channels
            one = len(names) == 1
            try:
                scored = _observe(model, observe, ts, values)
            except Exception as exc:
                scored = [_reason(exc)] * len(run)
            predicted_at = datetime.now(UTC)
            # The run's previous reading (-1: none yet); a model frame placed after it carries
            # its ts, whether the model scored it or failed on it.
            previous = -1
            for i, out in zip(run, scored, strict=True):
                r = readings[i]
                if out.__class__ is str:
                    if not replay:
                        body = prediction_body(
                            r, "error", version, predicted_at, None, None, False, out, (), stamps
                        )
                        said[i] = ("prediction", sensor_id, False, body)
                    previous = i
                    continue
                forecast, score, flag, explanation, events, scored_by = out
                if scored_by != version:
                    # Refitted after the previous reading: its frame follows that one.
                    version = scored_by
                    swaps.append((sensor_id, version))
                    if not replay:
                        if previous >= 0:
                            message = _model_message(sensor_id, version, readings[previous].ts)
                            after.setdefault(previous, []).append(message)
                        else:
                            before[i] = [_model_message(sensor_id, version, r.ts)]
                if events is None:
                    events = _track(sensor_id, r.ts, score, flag, explanation)
                previous = i
                if replay:
                    continue
                if events:
                    messages = after.setdefault(i, [])
                    for event in events:
                        raised += event.state == "raised"
                        cleared += event.state == "cleared"
                        messages.append(
                            ("alarm", sensor_id, True, wire.alarm_body(sensor_id, event))
                        )
                if score != score:  # NaN: still warming up
                    body = prediction_body(
                        r, "warming_up", version, predicted_at, None, None, False, None, (), stamps
                    )
                    said[i] = ("prediction", sensor_id, False, body)
                    continue
                anomaly = bool(flag)
                anomalies += anomaly
                body = prediction_body(
                    r, "ok", version, predicted_at,
                    {names[0]: forecast[0]}
                    if one and len(forecast) == 1
                    else dict(zip(names, forecast, strict=True)),
                    score, anomaly, None, explanation if anomaly else (), stamps,
                )  # fmt: skip
                said[i] = ("prediction", sensor_id, anomaly, body)
            if model.version != version:
                # Refitted after the run's last reading.
                swaps.append((sensor_id, model.version))
                if previous >= 0 and not replay:
                    message = _model_message(sensor_id, model.version, readings[previous].ts)
                    after.setdefault(previous, []).append(message)
        fit_seconds.extend(_drain_fits(_models[sensor_id]))
        fit_failures += _drain_failures(_models[sensor_id])
    if replay:
        return wire.BatchOutcome(b"", 0, 0, 0)

    bodies: list[wire.Body] = said
    if before or after:
        bodies = []
        for i, message in enumerate(said):
            if i in before:
                bodies.extend(before[i])
            bodies.append(message)
            if i in after:
                bodies.extend(after[i])
    return wire.BatchOutcome(
        wire.encode_batch(bodies), len(bodies), len(readings), anomalies, tuple(swaps),
        raised, cleared, tuple(fit_seconds), fit_failures,
    )  # fmt: skip


def _model_message(sensor_id: str, version: int, ts: float) -> wire.Body:
    return ("model", sensor_id, False, wire.model_body(sensor_id, version, ts))


def _track(
    sensor_id: str, ts: float, score: float, flag: bool, explanation: Explanation
) -> list[Any]:
    """Alarm events from the service's own tracker, for a model that tracks none itself."""
    if score != score:  # NaN while warming up: no judgement yet
        return []
    tracker = _trackers.get(sensor_id)
    if tracker is None:
        tracker = _trackers[sensor_id] = AlarmTracker(sensor_id, _options.alarms)
    event = tracker.update(ts, score, flag, explanation)
    return [] if event is None else [event]


def _drain_fits(model: SensorModel) -> list[float]:
    durations: list[float] | None = getattr(model, "fit_seconds", None)
    if not durations:
        return []
    out = list(durations)
    durations.clear()
    return out


def _drain_failures(model: SensorModel) -> int:
    failures = getattr(model, "fit_failures", 0)
    if failures:
        model.fit_failures = 0  # type: ignore[attr-defined]
    return int(failures)


# -- state: checkpoints, persistence, partitions ----------------------------------------------


def _record(sensor_id: str, model: SensorModel) -> dict[str, Any]:
    tracker = _trackers.get(sensor_id)
    return {
        "channels": model.channels,
        "version": model.version,
        "state": model.state(),
        "alarms": None if tracker is None else tracker.state(),
    }


def _restore(sensor_id: str, record: dict[str, Any]) -> None:
    model = _model_for(sensor_id, tuple(record["channels"]))
    model.restore(record["state"])
    model.version = record["version"]
    if record.get("alarms") is not None:
        tracker = _trackers[sensor_id] = AlarmTracker(sensor_id, _options.alarms)
        tracker.restore(record["alarms"])


STATES_LEVEL = 1
"""zlib level of an :func:`export_states` blob: the fastest. A runner keeps the last
checkpoint of its process in the service's memory, and a Redis worker writes each
partition's to Redis every few seconds; compressed, a checkpoint of the nab-dev series takes
about a quarter of its pickle (regular timestamps, values of few digits; the simulator's
random noise, about two thirds), for about a third more time in the model process."""


def _pack_states(records: dict[str, dict[str, Any]]) -> bytes:
    return zlib.compress(pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL), STATES_LEVEL)


def _unpack_states(blob: bytes) -> dict[str, dict[str, Any]]:
    """The records of a blob of :func:`_pack_states`, or of a plain pickle (as blobs were
    before they were compressed: a Redis partition saved by an older worker)."""
    if blob[:1] != pickle.PROTO:
        blob = zlib.decompress(blob)
    records: dict[str, dict[str, Any]] = pickle.loads(blob)
    return records


def export_states(partition: int = 0, partitions: int = 1) -> bytes:
    """The models of this process (of one Redis partition's sensors when ``partitions``
    is above 1), pickled and compressed in one blob."""
    return _pack_states(
        {
            sid: _record(sid, m)
            for sid, m in _models.items()
            if partitions == 1 or shard_of(sid, partitions) == partition
        }
    )


def import_states(*blobs: bytes) -> list[str]:
    """Restore models exported by :func:`export_states` or :func:`evict_sensors`; returns
    their sensor ids."""
    restored: list[str] = []
    for blob in blobs:
        records = _unpack_states(blob)
        for sensor_id, record in records.items():
            _restore(sensor_id, record)
        restored.extend(records)
    return restored


def drop_partition(partition: int, partitions: int) -> int:
    """Forget the models of a partition this process no longer owns; returns how many."""
    gone = [sid for sid in _models if shard_of(sid, partitions) == partition]
    for sid in gone:
        del _models[sid]
        _trackers.pop(sid, None)
    return len(gone)


# Persistence: one file per sensor, ``<model_dir>/<sensor_id>.model``, written atomically by
# the process that owns the sensor (sensor ids never contain "/", so they are safe file names).


def _save_one(sensor_id: str, model: SensorModel) -> bool:
    assert _model_dir is not None
    record = {"format": _FORMAT, "model": _model_path, "sensor_id": sensor_id}
    record.update(_record(sensor_id, model))
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
    """Save every model of this process to the model directory; returns how many."""
    if _model_dir is None:
        return 0
    os.makedirs(_model_dir, exist_ok=True)
    return sum(_save_one(sensor_id, model) for sensor_id, model in _models.items())


def load_states(paths: list[str]) -> int:
    """Load models saved by :func:`save_states`; returns how many were restored.

    A file made by another model class or format, or that does not load, is skipped with a
    warning: that sensor starts warming up again.
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
            log.warning("%s was saved by another model or format; ignored", path)
            return None
        _restore(record["sensor_id"], record)
    except Exception:
        log.exception("cannot load the model in %s; that sensor warms up again", path)
        return None
    return _models[record["sensor_id"]]


def evict_sensors(sensor_ids: list[str], export: bool = False) -> dict[str, bytes]:
    """Forget idle sensors' models, each kept first so a returning sensor resumes from it:
    with ``export``, returned as an :func:`import_states` blob of its own (the Redis worker
    keeps it in Redis); otherwise saved to the model directory when one is set. Returns the
    exported blobs by sensor id."""
    exported: dict[str, bytes] = {}
    for sid in sensor_ids:
        model = _models.get(sid)
        if model is None:
            continue
        if export:
            exported[sid] = _pack_states({sid: _record(sid, model)})
        elif _model_dir is not None:
            _save_one(sid, model)
        del _models[sid]
        _trackers.pop(sid, None)
    return exported
