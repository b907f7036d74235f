"""A benchmark-only model whose refits do real scikit-learn work (about 100 ms each).

``SENSORCAST_MODEL=bench.heavy:Model``. Scoring is a cheap z-score, as in the default model,
but every ``retrain_every`` readings of a sensor ask for a refit that trains an
IsolationForest on 2,000 rows resampled from the sensor's window: the kind of fit that stalls
an event loop for 100 ms or more when it runs there, which is what ``bench/loop_lag.py``
shows side by side for the executors.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from app.models.base import FloatArray, ModelOptions, Observation


class Model:
    history = 512
    min_history = 16
    retrain_every = 200
    z_threshold = 4.0
    fit_rows = 2000
    trees = 200

    def __init__(
        self, sensor_id: str, channels: tuple[str, ...], options: ModelOptions | None = None
    ) -> None:
        self.sensor_id = sensor_id
        self.channels = channels
        self.version = 0
        self._window = np.empty((0, len(channels)))
        self._mean: FloatArray | None = None
        self._std: FloatArray | None = None
        self._since_job = 0
        self._pending = False

    def observe(self, ts: FloatArray, values: FloatArray) -> Observation:
        k = len(values)
        self._window = np.concatenate([self._window, values])[-self.history :]
        self._since_job += k
        if self._mean is None or self._std is None:
            nan = np.full(k, np.nan)
            return Observation(np.full_like(values, np.nan), nan, np.zeros(k, dtype=bool))
        z = np.abs((values - self._mean) / self._std).max(axis=1)
        forecast = np.repeat(self._mean[None, :], k, axis=0)
        return Observation(forecast, np.tanh(z / self.z_threshold), z > self.z_threshold)

    def training_job(self, now: float) -> Any | None:
        if self._pending:
            return None
        due = self._since_job >= self.retrain_every or (
            self._mean is None and len(self._window) >= self.min_history
        )
        if not due:
            return None
        self._pending = True
        self._since_job = 0
        return self._window.copy()

    def install(self, fitted: Any) -> bool:
        self._pending = False
        if fitted is None:
            return False
        self._mean, self._std = fitted
        self.version += 1
        return True

    @classmethod
    def fit(cls, job: Any) -> Any:
        from sklearn.ensemble import IsolationForest

        window: FloatArray = job
        rng = np.random.default_rng(len(window))
        rows = window[rng.integers(0, len(window), cls.fit_rows)]
        rows = rows + rng.normal(0, 1e-3, rows.shape)
        IsolationForest(n_estimators=cls.trees, random_state=0).fit(rows)
        std = window.std(axis=0)
        return window.mean(axis=0), np.where(std > 1e-9, std, 1e-9)

    def state(self) -> Any:
        return {
            "version": self.version,
            "window": self._window,
            "mean": self._mean,
            "std": self._std,
        }

    def restore(self, state: Any) -> None:
        self.version = state["version"]
        self._window = state["window"]
        self._mean, self._std = state["mean"], state["std"]
        self._pending = False
