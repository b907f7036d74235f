"""Trusted hosts: requests whose ``Host`` the service does not answer to are refused.

Against DNS rebinding: a page on ``evil.example`` whose name is re-pointed at 127.0.0.1 is
same-origin to the service in the browser, so the origin check alone lets it read
predictions and post readings. Its requests still carry ``Host: evil.example``; refusing
names the service was not configured for closes that door.

A pure ASGI middleware rather than Starlette's ``TrustedHostMiddleware``: it looks at one
header without building a ``Headers`` object, so ``POST /v1/readings`` pays well under a
microsecond for it, and it refuses a WebSocket with an HTTP 400 before ``accept``.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from app.logs import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from app.edge import RefusalLog

log = logging.getLogger(__name__)

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_NAME = re.compile(r"(\*\.)?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?")


def check_host_pattern(pattern: str) -> str:
    """A ``trusted_hosts`` entry, normalised: a name, ``*.name`` or ``*``; IP literals too.

    Examples:
        >>> check_host_pattern("API.example.com"), check_host_pattern("*.example.com")
        ('api.example.com', '*.example.com')
        >>> check_host_pattern("[::1]")
        '::1'
        >>> check_host_pattern("http://x")
        Traceback (most recent call last):
        ...
        ValueError: 'http://x' is not a host name (such as api.example.com or *.example.com)

    Raises:
        ValueError: not a host name, a ``*.`` pattern, ``*`` or an IP address.
    """
    value = pattern.strip().lower()
    if value == "*":
        return value
    bare = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    if not _NAME.fullmatch(value) or len(value) > 253:
        raise ValueError(
            f"{pattern!r} is not a host name (such as api.example.com or *.example.com)"
        )
    return value


def is_loopback(host: str) -> bool:
    """Whether the service binds only a loopback address.

    Examples:
        >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("localhost")
        (True, True, True)
        >>> is_loopback("0.0.0.0"), is_loopback("10.0.0.5")
        (False, False)
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _name_of(host: bytes) -> str:
    """The name part of a ``Host`` value, lower case, without the port or brackets."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    name, _, _ = text.partition(":")
    return name


class HostPolicy:
    """Which ``Host`` names are served.

    Examples:
        >>> p = HostPolicy(["api.example.com", "*.internal"])
        >>> [p.allows(h) for h in (b"api.example.com:8000", b"x.internal", b"evil.example")]
        [True, True, False]
        >>> HostPolicy(["localhost", "127.0.0.1", "::1"]).allows(b"[::1]:8000")
        True
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        patterns = [check_host_pattern(p) for p in patterns]
        self.any = not patterns or "*" in patterns
        self.names = frozenset(p for p in patterns if not p.startswith("*"))
        self.suffixes = tuple(p[1:] for p in patterns if p.startswith("*."))
        self.patterns = patterns
        self._cache: dict[bytes, bool] = {}

    @classmethod
    def for_settings(cls, hosts: list[str], bind_host: str) -> HostPolicy:
        """The configured names; without any, loopback names on a loopback bind, else any."""
        if hosts:
            return cls(hosts)
        if is_loopback(bind_host):
            return cls(LOOPBACK_NAMES)
        return cls(["*"])

    def allows(self, host: bytes) -> bool:
        if self.any:
            return True
        hit = self._cache.get(host)
        if hit is None:
            name = _name_of(host)
            hit = name in self.names or name.endswith(self.suffixes)
            if len(self._cache) < 1024:  # only ever a few distinct values in honest use
                self._cache[host] = hit
        return hit


class TrustedHostMiddleware:
    """Refuses HTTP requests (400) and WebSocket handshakes (400, before accept) whose
    ``Host`` is not trusted; a request without ``Host`` is refused too."""

    def __init__(self, app: ASGIApp, *, policy: HostPolicy, refusals: RefusalLog) -> None:
        self.app = app
        self.policy = policy
        self.refusals = refusals

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.policy.any or scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        host = b""
        for name, value in scope["headers"]:
            if name == b"host":
                host = value
                break
        if self.policy.allows(host):
            await self.app(scope, receive, send)
            return
        self.refusals.count("untrusted_host")
        body = b'{"detail":"untrusted Host header (see SENSORCAST_TRUSTED_HOSTS)"}'
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 400, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        elif "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": 400, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": "untrusted Host"})
