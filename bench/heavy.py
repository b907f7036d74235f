"""A benchmark-only model whose refits do real scikit-learn work (about 100 ms each).

``SENSORCAST_MODEL=bench.heavy:Model``. Scoring is the baseline's cheap z-score
(:class:`app.models.simple.RollingZScore`), but every ``retrain_every`` readings of a sensor
refit the model inline, training an IsolationForest on 2,000 rows resampled from the
sensor's window first: the kind of fit that stalls an event loop for 100 ms or more when it
runs there, which is what ``bench/loop_lag.py`` shows side by side for the executors.
"""

from __future__ import annotations

import numpy as np

from app.models.base import FloatArray, ModelOptions
from app.models.simple import RollingZScore


class Model(RollingZScore):
    history = 512
    min_history = 16
    retrain_every = 200
    fit_rows = 2000
    trees = 200

    def __init__(
        self, sensor_id: str, channels: tuple[str, ...], options: ModelOptions | None = None
    ) -> None:
        # The benchmark's own refit cadence, whatever the service's model settings say.
        super().__init__(sensor_id, channels)
        self.forests = 0
        """IsolationForests trained: one per refit, or the benchmark compares nothing."""

    def _refit(self) -> None:
        # Inline, where the model runs (models refit inline: app/models/base.py): on the event
        # loop with SENSORCAST_EXECUTOR=inline, in a model process by default.
        from sklearn.ensemble import IsolationForest

        window: FloatArray = self._window
        rng = np.random.default_rng(len(window))
        rows = window[rng.integers(0, len(window), self.fit_rows)]
        rows = rows + rng.normal(0, 1e-3, rows.shape)
        IsolationForest(n_estimators=self.trees, random_state=0).fit(rows)
        self.forests += 1
        super()._refit()
