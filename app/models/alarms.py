"""Alarm episodes: anomalies that persist raise an alarm, held while the sensor stays
abnormal and cleared with hysteresis.

A flag is a judgement on one reading; an alarm is what an operator acts on. The tracker
turns a sensor's flags and scores, in ``ts`` order, into episodes, in the manner of a
Prometheus rule's ``for`` and ``keep_firing_for``:

- **raised** when ``raise_count`` of the last ``raise_window`` readings are anomalies (a lone
  spike stays a flag);
- **held** while readings stay abnormal: while raised, a reading counts as abnormal from a
  lower score (``hold_score``) than the one that flags it, so a fault that hovers around the
  threshold does not flap, or when the model says it is still away from the sensor's normal
  (the default model: from its level before the alarm, which a forecaster would soon follow);
- **cleared** after ``clear_count`` readings in a row are normal again; an alarm that comes
  back within ``flap_window`` readings of clearing reopens the same episode (same
  ``alarm_id``) and needs twice as many normal readings to clear again;
- after ``max_readings`` readings raised, the fault is declared the sensor's **new normal**:
  the alarm clears with ``reason: "new_normal"`` and the model learns it.

Everything here depends only on the readings, in order: the same history gives the same
episodes, however it was posted. The tracker runs in the model process, next to the model.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple


class AlarmOptions(NamedTuple):
    """How anomalies make alarm episodes (``SENSORCAST_ALARM_*`` settings)."""

    raise_count: int = 3
    """Anomalies among the last ``raise_window`` readings that raise an alarm."""
    raise_window: int = 6
    clear_count: int = 10
    """Normal readings in a row that clear it."""
    hold_score: float = 0.2
    """While raised, a reading scoring at least this is still abnormal (hysteresis; a flag is
    a score above 0.5 for the default model)."""
    flap_window: int = 288
    """Readings after a clear within which a new alarm reopens the same episode (288: a day
    of 5-minute readings)."""
    max_readings: int = 720
    """Readings an alarm may stay raised before its state is declared the new normal (0:
    never)."""


class AlarmEvent(NamedTuple):
    """An alarm episode changing state."""

    alarm_id: str
    state: str
    """``raised`` or ``cleared``."""
    started_at: float
    ended_at: float | None
    peak_score: float
    channels: tuple[str, ...]
    """Channels that drove the episode, most first."""
    detectors: tuple[str, ...]
    """Detectors that drove the episode, most first."""
    reason: str | None = None
    """Why it cleared: ``recovered``, or ``new_normal``."""


Explanation = tuple[tuple[str, str, float], ...]
"""``(channel, detector, share)`` triples, shares summing to 1, largest first; empty for a
reading that is not an anomaly. Detectors: ``spike``, ``level``, ``drift``, ``noise``,
``stuck``, ``multi-channel``."""


_FIELDS = (
    "sensor_id", "options", "active", "_recent", "_alarm_id", "_started", "_last_bad",
    "_peak", "_weights", "_normal_run", "_raised_for", "_since_clear", "_clear_needed",
)  # fmt: skip
"""An ``AlarmTracker``'s attributes, all of them its state (named here rather than read from
``__slots__``, which the compiled class does not keep; see ``app.models.compiled``)."""


class AlarmTracker:
    """The alarm episodes of one sensor.

    Examples:
        >>> t = AlarmTracker("s", AlarmOptions(raise_count=2, raise_window=3, clear_count=2))
        >>> bad = (2, 3)
        >>> events = [t.update(ts, 0.9 * (ts in bad), ts in bad, ()) for ts in range(7)]
        >>> [(e.alarm_id, e.state, e.started_at, e.ended_at) if e else None for e in events]
        [None, None, None, ('s@2000', 'raised', 2, None), None, ('s@2000', 'cleared', 2, 3), None]
    """

    __slots__ = _FIELDS

    def __init__(self, sensor_id: str, options: AlarmOptions) -> None:
        self.sensor_id = sensor_id
        self.options = options
        self.active = False
        self._recent: deque[tuple[float, float, Explanation] | None] = deque(
            maxlen=max(1, options.raise_window)
        )
        self._alarm_id = ""
        self._started = 0.0
        self._last_bad = 0.0
        self._peak = 0.0
        self._weights: dict[tuple[str, str], float] = {}
        self._normal_run = 0
        self._raised_for = 0
        self._since_clear = -1
        """Readings since the last clear; -1 before any."""
        self._clear_needed = options.clear_count

    def update(
        self,
        ts: float,
        score: float,
        flagged: bool,
        explanation: Explanation,
        abnormal: bool | None = None,
    ) -> AlarmEvent | None:
        """Take one in-order reading's judgement; return the transition it causes, if any.

        ``abnormal``: the model's own word, while an alarm is raised, on whether the reading
        is still away from the sensor's normal (say, from its level before the alarm). When
        given, it decides alone: detectors soon follow a sustained fault, and flag its end as
        a new shift. None leaves it to the flags and scores.
        """
        opts = self.options
        if not self.active:
            if self._since_clear >= 0:
                self._since_clear += 1
            self._recent.append((ts, score, explanation) if flagged else None)
            if not flagged or sum(r is not None for r in self._recent) < opts.raise_count:
                return None
            reopen = 0 <= self._since_clear <= opts.flap_window
            if reopen:
                self._clear_needed = min(self._clear_needed * 2, opts.clear_count * 8)
            else:
                self._clear_needed = opts.clear_count
                self._weights = {}
                self._peak = 0.0
                first = next(r for r in self._recent if r is not None)
                self._started = first[0]
                self._alarm_id = f"{self.sensor_id}@{_stamp(first[0])}"
            for r in self._recent:
                if r is not None:
                    self._note(r[1], r[2])
            self._recent.clear()
            self.active = True
            self._normal_run = 0
            self._raised_for = 0
            self._last_bad = ts
            return self._event("raised")
        self._raised_for += 1
        if abnormal if abnormal is not None else flagged or score >= opts.hold_score:
            self._normal_run = 0
            self._last_bad = ts
            if flagged:
                self._note(score, explanation)
        else:
            self._normal_run += 1
            if self._normal_run >= self._clear_needed:
                return self._clear("recovered")
        if opts.max_readings and self._raised_for >= opts.max_readings:
            self._since_clear = opts.flap_window + 1  # a new normal is not a flap
            return self._clear("new_normal")
        return None

    def _note(self, score: float, explanation: Explanation) -> None:
        self._peak = max(self._peak, score)
        for channel, detector, share in explanation:
            key = (channel, detector)
            self._weights[key] = self._weights.get(key, 0.0) + share * score

    def _clear(self, reason: str) -> AlarmEvent:
        self.active = False
        if reason != "new_normal":
            self._since_clear = 0
        return self._event("cleared", self._last_bad, reason)

    def _event(
        self, state: str, ended: float | None = None, reason: str | None = None
    ) -> AlarmEvent:
        channels: dict[str, float] = {}
        detectors: dict[str, float] = {}
        for (channel, detector), weight in self._weights.items():
            channels[channel] = channels.get(channel, 0.0) + weight
            detectors[detector] = detectors.get(detector, 0.0) + weight
        return AlarmEvent(
            self._alarm_id, state, self._started, ended, round(self._peak, 6),
            tuple(sorted(channels, key=lambda k: -channels[k])),
            tuple(sorted(detectors, key=lambda k: -detectors[k])),
            reason,
        )  # fmt: skip

    def state(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in _FIELDS}

    def restore(self, state: dict[str, object]) -> None:
        for name, value in state.items():
            setattr(self, name, value)


def _stamp(ts: float) -> str:
    """A compact, exact id part for an event time (milliseconds).

    Examples:
        >>> _stamp(1780000000.25)
        '1780000000250'
    """
    return str(round(ts * 1000))
