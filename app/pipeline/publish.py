"""Publish each batch's messages on the backend, and turn them into frames on the way out.

The worker already made each prediction's JSON body. A batch travels as one payload: the
bodies and what the hub needs to route them (kind, sensor, anomaly flag). The backend numbers
the batch atomically with appending it (``seq`` of its first message), so ``seq`` rises in
the order every API replica sees. The hub of each replica then makes each frame once, by
splicing ``type``, ``seq`` and ``epoch`` in front of the body.
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from app.backends.base import Backend
from app.pipeline.inference import Prediction, Swap

CHANNEL = "predictions"


class Message(msgspec.Struct, frozen=True, gc=False):
    """One server frame as the hub sees it.

    A struct the garbage collector does not track (its fields cannot form cycles): the hub
    keeps up to ``history_max_frames`` of them, and as NamedTuples (which CPython never
    untracks) every full collection walked them all, a pause of the event loop of 50-90 ms
    with 100,000 frames kept.
    """

    seq: int
    kind: str
    """``prediction`` or ``model``."""
    sensor_id: str
    is_anomaly: bool
    frame: str
    """The whole JSON text frame."""


Body = tuple[str, str, bool, bytes]
"""(kind, sensor_id, is_anomaly, JSON object without type/seq/epoch)."""

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[tuple[str, str, bool, bytes]])


def encode_batch(bodies: list[Body]) -> bytes:
    """Pack a batch of message bodies for the backend (one publish per batch)."""
    return _encoder.encode(bodies)


def decode_batch(first_seq: int, payload: bytes, epoch: str) -> list[Message]:
    """Number a published batch and make its frames.

    Examples:
        >>> payload = encode_batch([("prediction", "a", False, b'{"sensor_id":"a"}')])
        >>> decode_batch(7, payload, "e1")[0].frame
        '{"type":"prediction","seq":7,"epoch":"e1","sensor_id":"a"}'
    """
    head = '{"type":"%s","seq":%d,"epoch":"' + epoch + '",'
    return [
        Message(seq, kind, sensor_id, is_anomaly, head % (kind, seq) + body[1:].decode())
        for seq, (kind, sensor_id, is_anomaly, body) in enumerate(
            _decoder.decode(payload), first_seq
        )
    ]


def batch_bodies(predictions: list[Prediction], swaps: list[Swap]) -> list[Body]:
    """Model swaps first (they happened before the batch was scored), then predictions."""
    bodies: list[Body] = []
    if swaps:
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z").encode()
        for swap in swaps:
            body = b'{"sensor_id":"%s","model_version":%d,"swapped_at":"%s"}' % (
                swap.sensor_id.encode(),
                swap.model_version,
                now,
            )
            bodies.append(("model", swap.sensor_id, False, body))
    bodies.extend(("prediction", p.sensor_id, p.is_anomaly, p.body) for p in predictions)
    return bodies


class Publisher:
    """Publishes each batch's messages, in the order batches are handed in."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.published = 0
        self.last_seq = 0
        """The highest seq published so far."""

    async def publish(self, predictions: list[Prediction], swaps: list[Swap]) -> int:
        """Publish a batch; returns the number of messages."""
        bodies = batch_bodies(predictions, swaps)
        if not bodies:
            return 0
        first = await self.backend.publish(CHANNEL, encode_batch(bodies), len(bodies))
        self.published += len(bodies)
        self.last_seq = first + len(bodies) - 1
        return len(bodies)
