"""A small, fast model: rolling-mean forecast and z-score anomalies on each channel.

It is the baseline every other model is compared with, and the model that exercises the
whole pipeline (warm-up, inline retraining, model swaps) at almost no cost.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from app.models.base import FloatArray, ModelOptions, Observation


class RollingZScore:
    """Forecast: mean of the last ``forecast_span`` readings. Score: max |z| over channels.

    ``z`` uses the mean and standard deviation fitted on the last ``history`` readings, so
    a fit is what ends warm-up. A reading is an anomaly when ``|z| > z_threshold``; the score
    is ``tanh(|z| / z_threshold)``, about 0.76 at the threshold.
    """

    history = 256
    min_history = 16
    forecast_span = 16
    retrain_every = 500
    z_threshold = 4.0

    def __init__(
        self, sensor_id: str, channels: tuple[str, ...], options: ModelOptions | None = None
    ) -> None:
        if options is not None:
            self.history = options.history_readings
            self.min_history = max(2, options.warmup_readings)
            self.retrain_every = options.retrain_every_readings
        self.sensor_id = sensor_id
        self.channels = channels
        self.version = 0
        self._window = np.empty((0, len(channels)))
        self._mean: FloatArray | None = None
        self._std: FloatArray | None = None
        self._since_fit = 0

    def observe(self, ts: FloatArray, values: FloatArray) -> Observation:
        # Fit points depend only on how many readings came before, never on how they were
        # split into calls: the readings are taken in runs that end where a fit is due.
        parts: list[Observation] = []
        start = 0
        while start < len(values):
            end = min(len(values), start + self._until_fit())
            parts.append(self._observe_run(values[start:end]))
            self._since_fit += end - start
            if self._until_fit() == 0:
                self._refit()
            start = end
        if len(parts) == 1:
            return parts[0]
        return Observation(
            np.concatenate([p.forecast for p in parts]),
            np.concatenate([p.score for p in parts]),
            np.concatenate([p.is_anomaly for p in parts]),
        )

    def _until_fit(self) -> int:
        if self._mean is None:
            return max(0, self.min_history - len(self._window))
        return max(0, self.retrain_every - self._since_fit)

    def _observe_run(self, values: FloatArray) -> Observation:
        k = len(values)
        joined = np.concatenate([self._window, values])
        self._window = joined[-self.history :]
        span = self.forecast_span
        # Mean of the last `span` rows ending at each new row, through a cumulative sum.
        csum = np.cumsum(np.concatenate([np.zeros((1, joined.shape[1])), joined]), axis=0)
        ends = np.arange(len(joined) - k + 1, len(joined) + 1)
        starts = np.maximum(ends - span, 0)
        forecast = (csum[ends] - csum[starts]) / (ends - starts)[:, None]
        if self._mean is None or self._std is None:
            nan = np.full(k, np.nan)
            return Observation(np.full_like(forecast, np.nan), nan, np.zeros(k, dtype=bool))
        z = np.abs((values - self._mean) / self._std).max(axis=1)
        return Observation(forecast, np.tanh(z / self.z_threshold), z > self.z_threshold)

    def _refit(self) -> None:
        std = self._window.std(axis=0)
        self._mean = self._window.mean(axis=0)
        self._std = np.where(std > 1e-9, std, 1e-9)
        self._since_fit = 0
        self.version += 1

    def state(self) -> Any:
        return {
            "version": self.version,
            "window": self._window,
            "mean": self._mean,
            "std": self._std,
            "since_fit": self._since_fit,
        }

    def restore(self, state: Any) -> None:
        self.version = state["version"]
        self._window = state["window"]
        self._mean, self._std = state["mean"], state["std"]
        self._since_fit = state["since_fit"]
