"""Backends chosen by URL: ``memory://`` (the default) or ``redis://host:port/db``."""

from __future__ import annotations

from app.backends.base import Backend


def backend_from_url(url: str | Backend, *, timeout_s: float = 2.0) -> Backend:
    """Make the backend a URL names; a ready backend object is returned as it is.

    The implementation is imported only when its scheme is asked for, so ``redis`` stays an
    optional dependency.

    Raises:
        ValueError: the scheme is unknown or not available in this build.
    """
    if not isinstance(url, str):
        return url
    scheme = url.partition("://")[0]
    if scheme == "memory":
        from app.backends.memory import MemoryBackend

        return MemoryBackend(url)
    if scheme in {"redis", "rediss"}:
        try:
            from app.backends.redis import RedisBackend
        except ImportError:
            raise ValueError(
                f"backend {url!r} needs the redis extra: pip install 'sensorcast[redis]'"
            ) from None
        return RedisBackend(url, timeout_s=timeout_s)
    raise ValueError(f"unknown backend scheme {scheme!r} in {url!r}: use memory:// or redis://")


__all__ = ["Backend", "backend_from_url"]
