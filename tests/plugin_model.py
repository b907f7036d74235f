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
    """Forecast: the last value. Score: distance from the fitted mean, in fitted std units.

    It fits once, inline, when ``warmup_readings`` readings are in.
    """

    def __init__(self, sensor_id: str, channels: tuple[str, ...], options: ModelOptions) -> None:
        self.sensor_id = sensor_id
        self.channels = channels
        self.version = 0
        self.options = options
        self.seen: list[list[float]] = []
        self.fitted: tuple[FloatArray, FloatArray] | None = None

    def observe(self, ts: FloatArray, values: FloatArray) -> Observation:
        if np.any(values == UNLUCKY):
            # Raise before changing any state, so the service can retry reading by reading.
            raise ValueError("unlucky value")
        forecast, score, flag = [], [], []
        for row in values:
            self.seen.append(row.tolist())
            if self.fitted is None:
                forecast.append(np.full(len(row), np.nan))
                score.append(np.nan)
                flag.append(False)
                if len(self.seen) >= self.options.warmup_readings:
                    window = np.array(self.seen[-self.options.history_readings :])
                    self.fitted = window.mean(axis=0), np.maximum(window.std(axis=0), 1e-9)
                    self.version += 1
                continue
            mean, std = self.fitted
            z = float(np.abs((row - mean) / std).max())
            forecast.append(row.copy())
            score.append(float(np.tanh(z / 4)))
            flag.append(z > 4)
        return Observation(np.array(forecast), np.array(score), np.array(flag, dtype=bool))

    def state(self) -> Any:
        return {"version": self.version, "seen": self.seen, "fitted": self.fitted}

    def restore(self, state: Any) -> None:
        self.version, self.seen, self.fitted = state["version"], state["seen"], state["fitted"]
