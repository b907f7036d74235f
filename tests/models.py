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


def die_while_sending_a_result() -> None:
    """Run in a model process: write the start of a result on the process's result pipe,
    then exit, as a process the OOM killer takes half-way through sending its result."""
    import gc
    import struct
    from multiprocessing.queues import SimpleQueue

    queue = next(o for o in gc.get_objects() if isinstance(o, SimpleQueue))
    # A message's header (its length: 1 MiB), then one byte of it.
    queue._writer._send(struct.pack("!i", 1 << 20) + b"\x80")  # type: ignore[attr-defined]
    os._exit(1)
