"""Model classes used by the tests as ``SENSORCAST_MODEL=tests.models:Name``."""

from __future__ import annotations

import os
import signal

from app.models.base import FloatArray, Observation
from app.models.simple import RollingZScore

POISON = 666.0


class Poisoned(RollingZScore):
    """Kills its own worker process whenever it sees the value 666 (a segfault stand-in)."""

    def observe(self, ts: FloatArray, values: FloatArray) -> Observation:
        if (values == POISON).any():
            os.kill(os.getpid(), signal.SIGKILL)
        return super().observe(ts, values)
