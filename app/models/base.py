"""The model Protocol.

A model is a class, named by ``SENSORCAST_MODEL=module:Class``. The service makes one
instance per sensor, inside the model process that owns the sensor, and calls ``observe``
with the sensor's readings in ``ts`` order of arrival. The model refits itself inline, inside
``observe``, at points that depend only on its own readings (a count of readings, or event
time from their ``ts``), never on how readings were batched or how fast they came: so a
sensor's predictions are the same however its history was posted, and a process rebuilt from a
checkpoint and a replay of the readings since ends up exactly where the lost one was.

The constructor also gets the :class:`ModelOptions` taken from the settings (history length,
warm-up, retraining cadence); a model may ignore them.

A minimal model::

    class LastValue:
        def __init__(self, sensor_id: str, channels: tuple[str, ...], options: ModelOptions):
            self.channels, self.version, self.last = channels, 0, None

        def observe(self, ts, values):
            ...   # refit here when due; bump self.version when a new fit is in use
            return Observation(forecast, score, is_anomaly)

        def state(self): return self.last
        def restore(self, state): self.last = state

``tests/plugin_model.py`` is a complete example, run end to end by the tests.

A model that scores in Python floats may also define ``observe_lists`` (see
:class:`ListObserver`): the service then calls it instead of ``observe``, with the same readings
as plain lists, and saves building arrays the model would turn straight back into lists.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from app.models.alarms import AlarmEvent, AlarmOptions, Explanation

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]


class ModelOptions(NamedTuple):
    """Settings every model is built with (from ``SENSORCAST_*``, see ``app/config.py``)."""

    history_readings: int = 512
    """Readings kept per sensor for refitting."""
    warmup_readings: int = 48
    """Readings needed before the first fit; predictions are ``warming_up`` until it lands."""
    retrain_every_readings: int = 2000
    """Refit after this many new readings."""
    alarms: AlarmOptions = AlarmOptions()
    """When anomalies make an alarm episode (raised, held, cleared)."""
    retrain_interval_s: float = 86_400.0
    """Refit after this much event time (the readings' own ``ts``), if new readings came in."""


class Observation(NamedTuple):
    """What a model says about ``k`` readings of one sensor with ``c`` channels.

    Rows are in the order the readings were given. A row whose ``score`` is NaN is still
    warming up: the service sends it with ``status: "warming_up"`` and null forecast and score.
    Each field may also be a plain list of the same shape (a model that scores in Python
    saves the round trip through numpy).
    """

    forecast: FloatArray
    """(k, c): the forecast of the *next* reading, made after seeing each reading."""
    score: FloatArray
    """(k,): anomaly score in [0, 1] of each reading against what the model expected of it."""
    is_anomaly: BoolArray
    """(k,)"""
    explanation: list[Explanation] | None = None
    """(k,) optional: for each anomalous row, what drove its score; see :data:`Explanation`."""
    versions: list[int] | None = None
    """(k,) optional: the model version that scored each row. A model that refits inside a
    call says so here, so that each prediction carries the version that made it; without it,
    every row carries the version after the call."""
    alarms: list[tuple[int, AlarmEvent]] | None = None
    """Optional: alarm transitions the model tracked itself, as (row, event). A model that
    leaves it None gets the service's own tracker, run over its flags and scores."""


@runtime_checkable
class SensorModel(Protocol):
    """The model of one sensor."""

    version: int
    """Rises by one each time a newly fitted model is installed."""
    channels: tuple[str, ...]

    def observe(self, ts: FloatArray, values: FloatArray) -> Observation:
        """Score ``k`` readings in order and take them into the window.

        Args:
            ts: (k,) epoch seconds, as sent (not necessarily increasing).
            values: (k, c) finite values, columns in ``channels`` order.

        Refits inline when due (see the module docstring) and bumps ``version`` each time a
        new fit is put in use.

        Raises:
            Exception: any error, before changing any state; the service then retries reading
                by reading and marks the readings that still fail with ``status: "error"``.
        """
        ...

    def state(self) -> Any:
        """A picklable snapshot (model and window) for persistence and recovery."""
        ...

    def restore(self, state: Any) -> None:
        """Take back a snapshot made by ``state``."""
        ...


class ListObserver(Protocol):
    """Optional, beside :class:`SensorModel`: ``observe`` on plain lists."""

    def observe_lists(self, ts: list[float], values: list[Sequence[float]]) -> Observation:
        """What ``observe(np.array(ts), np.array(values))`` does, on the same readings given as
        a list of floats and a list of rows (one sequence of floats each, read only: the
        service passes the readings' own tuples).

        The service calls it instead of ``observe`` when the class (or the nearest base class
        that defines either) defines it: see :func:`takes_lists`. A subclass that overrides
        ``observe`` alone is given arrays.
        """
        ...


def takes_lists(cls: Any) -> bool:
    """Whether the service calls ``observe_lists`` rather than ``observe`` on ``cls``'s models:
    the class that defines it comes before the one that defines ``observe`` in the MRO.

    Examples:
        >>> class A:
        ...     def observe(self, ts, values): ...
        ...     def observe_lists(self, ts, values): ...
        >>> class B(A):
        ...     def observe(self, ts, values): ...
        >>> takes_lists(A), takes_lists(B)
        (True, False)
    """
    for klass in getattr(cls, "__mro__", ()):
        if "observe_lists" in vars(klass):
            return True
        if "observe" in vars(klass):
            return False
    return False


class SensorModelClass(Protocol):
    """The class itself: its constructor."""

    def __call__(
        self, sensor_id: str, channels: tuple[str, ...], options: ModelOptions
    ) -> SensorModel: ...


class ModelPathError(ValueError):
    """``SENSORCAST_MODEL`` does not name a usable class."""


def load_model_class(path: str) -> SensorModelClass:
    """Import ``module:Class`` and check that it looks like a model class.

    Raises:
        ModelPathError: with one line saying what is wrong.
    """
    module_name, _, class_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a plug-in may fail to import in any way: say so in one line
        raise ModelPathError(
            f"cannot import module {module_name!r}: {type(exc).__name__}: {exc}"
        ) from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ModelPathError(f"module {module_name!r} has no attribute {class_name!r}")
    if not isinstance(cls, type):
        raise ModelPathError(f"{path} is not a class")
    missing = [
        name for name in ("observe", "state", "restore") if not callable(getattr(cls, name, None))
    ]
    if missing:
        raise ModelPathError(f"{path} is not a model class: missing {', '.join(missing)}")
    model_class: SensorModelClass = cls  # type: ignore[assignment]
    return model_class
