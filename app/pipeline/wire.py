"""What crosses a boundary: into and out of a model process, and through the backend.

Shaped for crossing: a batch of readings travels into a model process as one msgpack blob
(the same bytes a Redis stream entry holds), and comes back as one blob of message bodies,
ready to publish as they are. Pickling a blob is a copy; pickling a Python object per reading
costs the event loop's process a microsecond each and holds the GIL meanwhile.

A message body is a frame without its ``type``, ``seq`` and ``epoch``: the backend numbers a
published batch atomically with appending it (``seq`` of its first message), and each API
replica's hub makes each frame once by splicing those three in front of the body.

This module is imported on both sides of the process boundary and by the backends; it
imports nothing of the service but the reading type.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import NamedTuple

import msgspec

from app.models.alarms import AlarmEvent, Explanation
from app.schemas import Reading

CHANNEL = "predictions"
"""The backend channel every message is published on."""

Body = tuple[str, str, bool, bytes]
"""(kind, sensor_id, is_anomaly, JSON object without type/seq/epoch). Kinds: ``prediction``,
``model``, ``alarm`` (alarms count as anomalies for ``anomalies_only``)."""


class ExplanationItem(msgspec.Struct):
    channel: str
    detector: str
    share: float


class PredictionBody(msgspec.Struct, omit_defaults=True):
    """A prediction frame without its ``type``, ``seq`` and ``epoch``."""

    sensor_id: str
    id: str | None
    ts: datetime
    values: dict[str, float]
    forecast: dict[str, float] | None
    anomaly_score: float | None
    is_anomaly: bool
    status: str
    model_version: int
    ingested_at: datetime
    predicted_at: datetime
    reason: str | None = None
    explanation: list[ExplanationItem] | None = None


class ModelBody(msgspec.Struct):
    """A model frame: a sensor's refitted model is in use from the reading at ``ts`` on."""

    sensor_id: str
    model_version: int
    ts: datetime
    swapped_at: datetime


class AlarmBody(msgspec.Struct, omit_defaults=True):
    """An alarm frame: an episode changed state."""

    alarm_id: str
    sensor_id: str
    state: str
    started_at: datetime
    ended_at: datetime | None
    peak_score: float
    channels: list[str]
    detectors: list[str]
    reason: str | None = None


class BatchOutcome(NamedTuple):
    """What a model process sends back for a batch: one blob and a few counts."""

    payload: bytes
    """The batch's message bodies, packed by :func:`encode_batch`, in publish order."""
    messages: int
    predictions: int
    anomalies: int
    swaps: tuple[tuple[str, int], ...] = ()
    """(sensor_id, model_version) of each model put in use during the batch."""
    alarms_raised: int = 0
    alarms_cleared: int = 0
    fit_seconds: tuple[float, ...] = ()
    fit_failures: int = 0


def stamp(ts: float) -> datetime:
    """``ts`` (epoch seconds) as an aware UTC datetime."""
    return datetime.fromtimestamp(ts, UTC)


class Stamps(dict[float, datetime]):
    """:func:`stamp` of each ``ts`` looked up, made once per value: a batch's readings share
    their ingest time, and often their ``ts`` (a gateway's sensors read at the same moments).

    Examples:
        >>> stamps = Stamps()
        >>> stamps[0.0] is stamps[0.0], len(stamps)
        (True, 1)
    """

    def __missing__(self, ts: float) -> datetime:
        value = self[ts] = stamp(ts)
        return value


_json = msgspec.json.Encoder()


def prediction_body(
    r: Reading,
    status: str,
    model_version: int,
    predicted_at: datetime,
    forecast: dict[str, float] | None = None,
    score: float | None = None,
    is_anomaly: bool = False,
    reason: str | None = None,
    explanation: Explanation = (),
    stamps: Stamps | None = None,
) -> bytes:
    """The JSON body of one reading's prediction: the one place a prediction is shaped.

    Called once per reading in a model process, so shaped for its cost: arguments by
    position, ``stamps`` shared by a batch.

    Examples:
        >>> r = Reading("a", "r-1", 0.0, ("value",), (1.5,), 0.0)
        >>> prediction_body(r, "error", 0, stamp(0.0), reason="boom")[:60]
        b'{"sensor_id":"a","id":"r-1","ts":"1970-01-01T00:00:00Z","val'
    """
    if stamps is None:
        stamps = Stamps()
    channels = r.channels
    body = PredictionBody(
        r.sensor_id,
        r.id,
        stamps[r.ts],
        {channels[0]: r.values[0]}
        if len(channels) == 1
        else dict(zip(channels, r.values, strict=True)),
        forecast,
        score,
        is_anomaly,
        status,
        model_version,
        stamps[r.ingested_at],
        predicted_at,
        reason,
        [ExplanationItem(c, d, s) for c, d, s in explanation] if explanation else None,
    )
    return _json.encode(body)


def model_body(sensor_id: str, version: int, ts: float) -> bytes:
    return _json.encode(ModelBody(sensor_id, version, stamp(ts), datetime.now(UTC)))


def alarm_body(sensor_id: str, event: AlarmEvent) -> bytes:
    return _json.encode(
        AlarmBody(
            event.alarm_id,
            sensor_id,
            event.state,
            stamp(event.started_at),
            None if event.ended_at is None else stamp(event.ended_at),
            event.peak_score,
            list(event.channels),
            list(event.detectors),
            event.reason,
        )
    )


def error_bodies(readings: list[Reading], reason: str) -> list[Body]:
    """``status: "error"`` predictions for readings the model stage could not score.

    Examples:
        >>> reading = Reading("a", None, 0.0, ("v",), (1.0,), 0.0)
        >>> [(kind, sid, flag, body)] = error_bodies([reading], "x")
        >>> kind, b'"status":"error"' in body, b'"reason":"x"' in body
        ('prediction', True, True)
    """
    now = datetime.now(UTC)
    stamps = Stamps()
    return [
        (
            "prediction",
            r.sensor_id,
            False,
            prediction_body(r, "error", 0, now, reason=reason, stamps=stamps),
        )
        for r in readings
    ]


# -- packing --------------------------------------------------------------------------------

_pack = msgspec.msgpack.Encoder()
_unpack_bodies = msgspec.msgpack.Decoder(list[tuple[str, str, bool, bytes]])
_unpack_readings = msgspec.msgpack.Decoder(list[Reading])


def encode_readings(readings: list[Reading]) -> bytes:
    """Pack readings for a model process or a Redis stream entry (one blob)."""
    return _pack.encode(readings)


class Packed(NamedTuple):
    """Readings packed as they wait for and cross into a model process: one msgpack array
    (:func:`encode_readings`), with what the service needs of them without unpacking.

    Packed at admission, a queued reading takes about 50 bytes instead of the 250-300 of its
    struct, strings and floats, so a queue can hold seconds of model work for little memory,
    and a batch is the joined bytes of its requests' shares.
    """

    blob: bytes
    size: int
    """Readings in it."""
    first_ingested_at: float
    last_ingested_at: float


def pack(readings: list[Reading]) -> Packed:
    """``readings`` (at least one) packed.

    Examples:
        >>> r = Reading("a", None, 1.0, ("v",), (2.0,), 5.0)
        >>> packed = pack([r, r])
        >>> packed.size, decode_readings(packed.blob) == [r, r], packed.last_ingested_at
        (2, True, 5.0)
    """
    return Packed(
        _pack.encode(readings), len(readings), readings[0].ingested_at, readings[-1].ingested_at
    )


def join(parts: list[Packed]) -> Packed:
    """One array of the readings of ``parts`` (at least one), in order, without unpacking.

    Examples:
        >>> rs = [Reading(str(n), None, 1.0, ("v",), (2.0,), float(n)) for n in range(70_000)]
        >>> parts = [pack(rs[:3]), pack(rs[3:20]), pack(rs[20:])]
        >>> joined = join(parts)
        >>> decode_readings(joined.blob) == rs, joined.size, joined.first_ingested_at
        (True, 70000, 0.0)
        >>> join(parts[:1]) is parts[0]
        True
    """
    if len(parts) == 1:
        return parts[0]
    count = 0
    items: list[bytes | memoryview] = [b""]
    for part in parts:
        count += part.size
        items.append(memoryview(part.blob)[_array_header_size(part.blob[0]) :])
    items[0] = _array_header(count)
    return Packed(b"".join(items), count, parts[0].first_ingested_at, parts[-1].last_ingested_at)


def _array_header_size(first: int) -> int:
    """Bytes of a msgpack array's header, from its first byte."""
    if first & 0xF0 == 0x90:  # fixarray: up to 15 items
        return 1
    if first == 0xDC:  # array 16
        return 3
    if first == 0xDD:  # array 32
        return 5
    raise ValueError(f"not a msgpack array: first byte {first:#x}")


def _array_header(count: int) -> bytes:
    if count < 16:
        return bytes((0x90 | count,))
    if count < 1 << 16:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


def decode_readings(blob: bytes) -> list[Reading]:
    return _unpack_readings.decode(blob)


def encode_batch(bodies: list[Body]) -> bytes:
    """Pack a batch of message bodies for the backend (one publish per batch)."""
    return _pack.encode(bodies)


def decode_bodies(payload: bytes) -> list[Body]:
    return _unpack_bodies.decode(payload)


class Message(msgspec.Struct, frozen=True, gc=False):
    """One server frame as the hub sees it.

    A struct the garbage collector does not track (its fields cannot form cycles): the hub
    keeps up to ``history_max_frames`` of them, and as NamedTuples (which CPython never
    untracks) every full collection walked them all, a pause of the event loop of 50-90 ms
    with 100,000 frames kept.
    """

    seq: int
    kind: str
    """``prediction``, ``model`` or ``alarm``."""
    sensor_id: str
    is_anomaly: bool
    frame: str
    """The whole JSON text frame."""


def decode_batch(first_seq: int, payload: bytes, epoch: str) -> list[Message]:
    """Number a published batch and make its frames.

    Examples:
        >>> payload = encode_batch([("prediction", "a", False, b'{"sensor_id":"a"}')])
        >>> decode_batch(7, payload, "e1")[0].frame
        '{"type":"prediction","seq":7,"epoch":"e1","sensor_id":"a"}'
    """
    return frames(first_seq, unpack_batch(payload), epoch)


def unpack_batch(payload: bytes) -> list[Body]:
    """A published batch's bodies, to number in slices with :func:`frames`."""
    return _unpack_bodies.decode(payload)


def frames(first_seq: int, bodies: list[Body], epoch: str) -> list[Message]:
    """Number ``bodies`` from ``first_seq`` and make their frames."""
    tail = ',"epoch":"' + epoch + '",'
    return [
        Message(
            seq,
            kind,
            sensor_id,
            is_anomaly,
            f'{{"type":"{kind}","seq":{seq}{tail}{body[1:].decode()}',
        )  # fmt: skip
        for seq, (kind, sensor_id, is_anomaly, body) in enumerate(bodies, first_seq)
    ]


BATCH_MAX_ITEMS = 500
"""Predictions per ``predictions`` frame (``batch=true``): bounds a frame to a few hundred
KiB."""


def client_frames(messages: list[Message], batch: bool) -> Iterator[tuple[str, int]]:
    """The text frames a subscriber gets for ``messages``, each with the seq of its last
    message: one frame each, or with ``batch`` runs of predictions in ``predictions`` frames.

    Examples:
        >>> ms = [Message(s, "prediction", "a", False, "{}") for s in (1, 2)]
        >>> list(client_frames(ms, batch=True))
        [('{"type":"predictions","items":[{},{}]}', 2)]
    """
    if not batch:
        for m in messages:
            yield m.frame, m.seq
        return
    # Runs of predictions between the other messages, in frames of at most BATCH_MAX_ITEMS.
    end = len(messages)
    start = 0
    for stop in [*(i for i, m in enumerate(messages) if m.kind != "prediction"), end]:
        for first in range(start, stop, BATCH_MAX_ITEMS):
            last = min(first + BATCH_MAX_ITEMS, stop) - 1
            run = [m.frame for m in messages[first : last + 1]]
            yield _predictions_frame(run), messages[last].seq
        if stop < end:
            yield messages[stop].frame, messages[stop].seq
        start = stop + 1


def _predictions_frame(items: list[str]) -> str:
    return '{"type":"predictions","items":[' + ",".join(items) + "]}"


def text_frames(texts: Iterable[str]) -> bytes:
    """WebSocket text frames, unmasked and unfragmented as a server sends them, end to end.

    Examples:
        >>> text_frames(["hi", "x" * 200])[:4], len(text_frames(["x" * 70_000]))
        (b'\\x81\\x02hi', 70010)
    """
    parts: list[bytes] = []
    for text in texts:
        data = text.encode()
        size = len(data)
        if size < 126:
            parts.append(_HEADS[size])
        elif size < 65536:
            parts.append(b"\x81\x7e" + size.to_bytes(2, "big"))
        else:
            parts.append(b"\x81\x7f" + size.to_bytes(8, "big"))
        parts.append(data)
    return b"".join(parts)


_HEADS = [bytes((0x81, n)) for n in range(126)]
