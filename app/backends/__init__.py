"""Backends chosen by URL: ``memory://`` (the default) or ``redis://host:port/db``."""

from __future__ import annotations

from app.backends.base import Backend


def backend_from_url(url: str | Backend) -> Backend:
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
        raise ValueError(f"backend {url!r}: the Redis backend is not available yet; use memory://")
    raise ValueError(f"unknown backend scheme {scheme!r} in {url!r}: use memory:// or redis://")


__all__ = ["Backend", "backend_from_url"]
