"""Topologies chosen by the backend URL's scheme, in one table.

``memory://`` (the default) is the embedded topology: in-process channels, and the model
stage runs in this process's pool. ``redis://host:port/db`` (or ``rediss://``, or
``redis+sentinel://host:26379,host2:26379/service/db`` behind Sentinels) scales out:
readings go to Redis streams and ``sensorcast worker`` processes run the model stage. Each
implementation is imported only when its scheme is asked for, so ``redis`` stays an optional
dependency (the way uvicorn maps a protocol name to ``"module:Class"``).
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

from app.backends.base import Backend


class Topology(NamedTuple):
    backend: str
    """``module:Class`` of the backend."""
    ingest: str
    """``module:Class`` of what admits readings in an API process (see ``app/api/deps.py``)."""
    extra: str | None = None
    """The optional dependency it needs, if any."""
    queue_max_readings: int = 100_000
    """The default of the setting: per shard queue in the service's memory (packed, about
    50 bytes a reading), or per partition stream in Redis."""


# Per partition on Redis: ``partitions`` of them (16) already wait for a few workers' model
# processes, seconds of work at this bound.
_REDIS = Topology(
    "app.backends.redis:RedisBackend", "app.pipeline.remote:RemoteIngest", "redis", 25_000
)

TOPOLOGIES: dict[str, Topology] = {
    "memory": Topology("app.backends.memory:MemoryBackend", "app.pipeline.pipeline:Pipeline"),
    "redis": _REDIS,
    "rediss": _REDIS,
    "redis+sentinel": _REDIS,
}


def topology_of(url: str) -> Topology:
    """The topology a backend URL names.

    Raises:
        ValueError: the scheme is unknown.

    Examples:
        >>> topology_of("redis://localhost:6379/0").ingest
        'app.pipeline.remote:RemoteIngest'
    """
    scheme, sep, _ = url.partition("://")
    topology = TOPOLOGIES.get(scheme) if sep else None
    if topology is None:
        known = ", ".join(f"{s}://" for s in TOPOLOGIES)
        raise ValueError(f"unknown backend {url!r}: use one of {known}")
    return topology


def load(path: str, extra: str | None = None) -> Any:
    """Import ``module:Class``.

    Raises:
        ValueError: it needs an optional dependency that is not installed.
    """
    module, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        if extra is None:
            raise
        raise ValueError(
            f"this backend needs the {extra} extra: pip install 'sensorcast[{extra}]'"
        ) from None


def backend_from_url(url: str | Backend, **options: Any) -> Backend:
    """Make the backend a URL names; a ready backend object is returned as it is.

    ``options`` are passed to the backend's constructor: ``timeout_s``, ``min_replicas`` and
    ``replica_timeout_ms`` (Redis) and ``max_pending_messages`` (memory) where the backend
    takes them.

    Raises:
        ValueError: the scheme is unknown or not available in this build.
    """
    if not isinstance(url, str):
        return url
    topology = topology_of(url)
    cls = load(topology.backend, topology.extra)
    accepted = getattr(cls, "OPTIONS", ())
    backend: Backend = cls(url, **{k: v for k, v in options.items() if k in accepted})
    return backend


__all__ = ["Backend", "TOPOLOGIES", "Topology", "backend_from_url", "load", "topology_of"]
