"""The alarm episodes an API process knows of: active ones, and recently cleared ones.

Each API replica builds its book from the ``alarm`` frames it receives, like the rest of its
hub, so every replica agrees without asking anyone: a model process raises and clears an
episode (``app/models/alarms.py``); an operator acknowledges one through any replica, which
publishes an ``acknowledged`` frame that every replica applies.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any


class AlarmBook:
    """Alarms by id: the active ones, and the last ``recent_max`` cleared ones.

    Examples:
        >>> book = AlarmBook(recent_max=2)
        >>> frame = {"type": "alarm", "alarm_id": "a@1", "sensor_id": "a", "state": "raised"}
        >>> book.apply(frame, json.dumps(frame))
        >>> [a["alarm_id"] for a in book.select("active")]
        ['a@1']
        >>> book.apply({**frame, "state": "cleared"}, "")
        >>> book.select("active"), [a["state"] for a in book.select("recent")]
        ([], ['cleared'])
    """

    def __init__(self, recent_max: int = 1000) -> None:
        self.recent_max = recent_max
        self.active: dict[str, dict[str, Any]] = {}
        self._frames: dict[str, str] = {}
        """The latest frame of each active alarm, for snapshots."""
        self.recent: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def get(self, alarm_id: str) -> dict[str, Any] | None:
        return self.active.get(alarm_id) or self.recent.get(alarm_id)

    def apply(self, frame: dict[str, Any], text: str) -> None:
        """Take an ``alarm`` frame (parsed, and its text) into the book."""
        alarm_id = frame.get("alarm_id")
        if not isinstance(alarm_id, str):
            return
        state = frame.get("state")
        record = {k: v for k, v in frame.items() if k not in ("type", "seq", "epoch", "snapshot")}
        if state == "acknowledged":
            known = self.get(alarm_id)
            if known is not None:
                known["acknowledged"] = True
                known["acknowledged_at"] = frame.get("acknowledged_at")
            return
        if state == "raised":
            # A reopened episode (it came back soon after clearing) must be seen again.
            self.recent.pop(alarm_id, None)
            record["acknowledged"] = False
            self.active[alarm_id] = record
            self._frames[alarm_id] = text
        elif state == "cleared":
            known = self.active.pop(alarm_id, None)
            self._frames.pop(alarm_id, None)
            record["acknowledged"] = bool(known and known.get("acknowledged"))
            if known and known.get("acknowledged_at"):
                record["acknowledged_at"] = known["acknowledged_at"]
            self.recent[alarm_id] = record
            self.recent.move_to_end(alarm_id)
            while len(self.recent) > self.recent_max:
                self.recent.popitem(last=False)

    def select(
        self, state: str = "all", wants: Callable[[str], bool] | None = None
    ) -> list[dict[str, Any]]:
        """Alarms in ``state`` (``active``, ``recent`` or ``all``), newest first."""
        out: list[dict[str, Any]] = []
        if state in ("active", "all"):
            out.extend(reversed(self.active.values()))
        if state in ("recent", "all"):
            out.extend(reversed(self.recent.values()))
        if wants is not None:
            out = [a for a in out if wants(str(a.get("sensor_id", "")))]
        return out

    def snapshot(self, wants: Callable[[str], bool]) -> list[str]:
        """The latest frame of each active alarm of the sensors wanted, marked as snapshot."""
        return [
            text[:-1] + ',"snapshot":true}'
            for alarm_id, text in self._frames.items()
            if text and wants(str(self.active[alarm_id].get("sensor_id", "")))
        ]


def acknowledged_body(alarm: dict[str, Any]) -> bytes:
    """The body of the ``acknowledged`` frame an acknowledgement publishes."""
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    body = {k: v for k, v in alarm.items() if k not in ("acknowledged", "acknowledged_at")}
    body.update(state="acknowledged", acknowledged_at=now)
    return json.dumps(body, separators=(",", ":")).encode()
