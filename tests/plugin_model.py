"""A plug-in model for the tests: the last value as forecast, and an error on 13.

It is a complete example of the :class:`app.models.base.SensorModel` Protocol, loaded by
the service through ``SENSORCAST_MODEL=tests.plugin_model:LastValue``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from app.models.base import FloatArray, ModelOptions, Observation

UNLUCKY = 13.0


class LastValue:
    """Forecast: the last value. Score: distance from the fitted mean, in fitted std units."""

    def __init__(self, sensor_id: str, channels: tuple[str, ...], options: ModelOptions) -> None:
        self.sensor_id = sensor_id
        self.channels = channels
        self.version = 0
        self.options = options
        self.seen: list[list[float]] = []
        self.fitted: tuple[FloatArray, FloatArray] | None = None
        self.pending = False
        self.since = 0

    def observe(self, ts: FloatArray, values: FloatArray) -> Observation:
        if np.any(values == UNLUCKY):
            # Raise before changing any state, so the service can retry reading by reading.
            raise ValueError("unlucky value")
        self.seen.extend(values.tolist())
        self.since += len(values)
        k = len(values)
        if self.fitted is None:
            return Observation(np.full(values.shape, np.nan), np.full(k, np.nan), np.zeros(k, bool))
        mean, std = self.fitted
        z = np.abs((values - mean) / std).max(axis=1)
        return Observation(values.copy(), np.tanh(z / 4), z > 4)

    def training_job(self, now: float) -> Any | None:
        if self.pending or self.since < self.options.warmup_readings:
            return None
        self.pending, self.since = True, 0
        return np.array(self.seen[-self.options.history_readings :])

    def install(self, fitted: Any) -> bool:
        self.pending = False
        self.fitted = fitted
        self.version += 1
        return True

    @staticmethod
    def fit(job: Any) -> Any:
        window: FloatArray = job
        return window.mean(axis=0), np.maximum(window.std(axis=0), 1e-9)

    def state(self) -> Any:
        return {"version": self.version, "seen": self.seen, "fitted": self.fitted}

    def restore(self, state: Any) -> None:
        self.version, self.seen, self.fitted = state["version"], state["seen"], state["fitted"]
