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


FAILS = 13.0
REFITS = 12.0


class RefitsThenFails(RollingZScore):
    """Raises on the value 13 (a reading the model cannot take) and counts the value 12 as a
    refit (its version goes up), for the model frames around a failed reading."""

    def observe(self, ts: FloatArray, values: FloatArray) -> Observation:
        if (values == FAILS).any():
            raise ValueError("cannot take 13")
        self.version += int((values == REFITS).sum())
        return super().observe(ts, values)
