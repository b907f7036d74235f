"""Which shard (or Redis partition) a sensor belongs to: the one place it is decided."""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import Protocol, TypeVar


def shard_of(sensor_id: str, shards: int) -> int:
    """The shard of ``shards`` that owns a sensor: stable across processes and restarts.

    Examples:
        >>> shard_of("pump-7", 16) == shard_of("pump-7", 16) < 16
        True
        >>> shard_of("anything", 1)
        0
    """
    if shards == 1:
        return 0
    return zlib.crc32(sensor_id.encode()) % shards


class _Owned(Protocol):
    @property
    def sensor_id(self) -> str: ...


R = TypeVar("R", bound=_Owned)


def split_by_shard(readings: Iterable[R], shards: int) -> list[list[R]]:
    """``readings`` by the shard of ``shards`` that owns each one's sensor, in their order
    within each shard; a sensor's shard is computed once (a request holds several readings
    of each sensor).

    Examples:
        >>> from types import SimpleNamespace as R
        >>> rs = [R(sensor_id=s) for s in ("a", "b", "a")]
        >>> [[r.sensor_id for r in part] for part in split_by_shard(rs, 1)]
        [['a', 'b', 'a']]
        >>> sum(len(part) for part in split_by_shard(rs, 16))
        3
    """
    parts: list[list[R]] = [[] for _ in range(shards)]
    if shards == 1:
        parts[0].extend(readings)
        return parts
    owners: dict[str, int] = {}
    for r in readings:
        owner = owners.get(r.sensor_id)
        if owner is None:
            owner = owners[r.sensor_id] = shard_of(r.sensor_id, shards)
        parts[owner].append(r)
    return parts
