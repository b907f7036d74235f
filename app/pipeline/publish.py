"""Stamp predictions with ``seq`` and ``epoch`` and publish them on the backend.

Frames are encoded here, once: the worker already made each prediction's JSON body, so a
frame is that body with ``type``, ``seq`` and ``epoch`` spliced in front. Subscribers on any
API replica receive the same bytes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import NamedTuple

import msgspec

from app.backends.base import Backend
from app.pipeline.inference import Prediction, Swap

CHANNEL = "predictions"


class Message(NamedTuple):
    """One server frame as the hub sees it."""

    seq: int
    kind: str
    """``prediction`` or ``model``."""
    sensor_id: str
    is_anomaly: bool
    frame: str
    """The whole JSON text frame."""


_envelope = msgspec.msgpack.Encoder()
_unenvelope = msgspec.msgpack.Decoder(list[tuple[int, str, str, bool, str]])


def encode_envelope(messages: list[Message]) -> bytes:
    """Pack a batch of messages for the backend (one publish per batch)."""
    return _envelope.encode(messages)


def decode_envelope(payload: bytes) -> list[Message]:
    return [Message(*m) for m in _unenvelope.decode(payload)]


class Publisher:
    """Numbers and publishes each batch's messages, in the order batches are handed in."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._epoch: bytes | None = None
        self.published = 0
        self.last_seq = 0
        """The highest seq published so far."""

    async def publish(self, predictions: list[Prediction], swaps: list[Swap]) -> int:
        """Publish a batch: model swaps first (they happened before its scoring), then
        predictions. Returns the number of messages."""
        count = len(predictions) + len(swaps)
        if count == 0:
            return 0
        if self._epoch is None:
            self._epoch = (await self.backend.epoch()).encode()
        epoch = self._epoch
        seq = await self.backend.reserve_seq(count)
        messages: list[Message] = []
        if swaps:
            now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            for swap in swaps:
                frame = (
                    b'{"type":"model","seq":%d,"epoch":"%s","sensor_id":"%s",'
                    b'"model_version":%d,"swapped_at":"%s"}'
                    % (seq, epoch, swap.sensor_id.encode(), swap.model_version, now.encode())
                )
                messages.append(Message(seq, "model", swap.sensor_id, False, frame.decode()))
                seq += 1
        head = b'{"type":"prediction","seq":%d,"epoch":"' + epoch + b'",'
        for p in predictions:
            frame = (head % seq) + p.body[1:]
            messages.append(Message(seq, "prediction", p.sensor_id, p.is_anomaly, frame.decode()))
            seq += 1
        await self.backend.publish(CHANNEL, encode_envelope(messages))
        self.published += count
        self.last_seq = seq - 1
        return count
