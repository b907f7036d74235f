"""Access control: API keys with scopes, the WebSocket origin check, per-key rate limits.

Keys come from ``SENSORCAST_API_KEYS`` (comma-separated) and ``SENSORCAST_API_KEYS_FILE``
(one per line, ``#`` comments), each as ``KEY`` or ``KEY:SCOPE+SCOPE``:

- scopes are ``ingest`` (POST readings), ``subscribe`` (WebSocket, GET /v1/sensors) and
  ``admin`` (/metrics), and ``admin`` implies the other two;
- a key without a scope list has every scope;
- a key is 16 to 256 characters of ``A-Z a-z 0-9 . _ ~ -``, so it needs no escaping in a
  ``key=`` query parameter.

Only SHA-256 digests of the keys are kept, compared with :func:`hmac.compare_digest` against
every configured key, so neither the comparison time nor the logs reveal a key. With no keys
set, the service is open and says so once in the log at start-up.

HTTP clients send ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``. Browsers cannot set
headers on a WebSocket, so WebSocket clients may also send ``?key=KEY``; HTTP routes refuse a
key in the query so that keys stay out of proxies' access logs.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from fastapi import Depends, HTTPException, Request, Security, WebSocket
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from app.access import Scope, normalise_origin, parse_key_entry, read_keys_file
from app.metrics import REFUSAL_BY_STATUS, count_refusal

if TYPE_CHECKING:
    from app.config import Settings

log = logging.getLogger(__name__)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class KeyRing:
    """The configured keys, as digests with their scopes."""

    def __init__(self, entries: Iterable[tuple[str, frozenset[Scope]]]) -> None:
        merged: dict[bytes, frozenset[Scope]] = {}
        for key, scopes in entries:
            digest = _digest(key)
            merged[digest] = merged.get(digest, frozenset()) | scopes
        self._entries = list(merged.items())

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str) -> tuple[bytes, frozenset[Scope]] | None:
        """The key's digest and scopes, or None for an unknown key.

        Every configured digest is compared, in constant time each, so the time taken does not
        depend on which key matched or how much of it.
        """
        digest = _digest(key)
        found: tuple[bytes, frozenset[Scope]] | None = None
        for candidate, scopes in self._entries:
            if hmac.compare_digest(digest, candidate):
                found = (candidate, scopes)
        return found


class TokenBucket:
    """A token bucket: ``burst`` requests at once, refilled at ``rate_per_s``.

    Examples:
        >>> bucket = TokenBucket(rate_per_s=2, burst=2, now=0.0)
        >>> bucket.take(0.0), bucket.take(0.0), bucket.take(0.0)
        (0.0, 0.0, 0.5)
        >>> bucket.take(0.5)
        0.0
    """

    def __init__(self, rate_per_s: float, burst: int, now: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> float:
        """Take a token; returns 0 when taken, else the seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate_per_s)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate_per_s


_QUERY_KEY = re.compile(r"(?<=[?&;])key=[^&;\s\"']*")


class RedactKeys(logging.Filter):
    """Replace ``key=...`` query values in log records with ``key=[redacted]``.

    uvicorn logs each WebSocket handshake with its query string at INFO (even with the access
    log off), and browsers can only send a WebSocket key in the query.

    Examples:
        >>> line = '"WebSocket %s" 403'
        >>> record = logging.LogRecord("u", 20, "", 0, line, ("/ws?a=1&key=s3",), None)
        >>> RedactKeys().filter(record), record.getMessage()
        (True, '"WebSocket /ws?a=1&key=[redacted]" 403')
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "key=" in message:
            record.msg = _QUERY_KEY.sub("key=[redacted]", message)
            record.args = None
        return True


def redact_keys_in_logs(names: Iterable[str] = ("uvicorn.error", "uvicorn.access")) -> None:
    """Install :class:`RedactKeys` on the named loggers, once each."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactKeys) for f in logger.filters):
            logger.addFilter(RedactKeys())


class Denial(NamedTuple):
    """Why a request is refused: the HTTP status, the reason, and extra headers."""

    status: int
    detail: str
    headers: dict[str, str]


_MISSING = Denial(
    401,
    "an API key is required: Authorization: Bearer KEY or X-API-Key: KEY",
    {"WWW-Authenticate": "Bearer"},
)
_UNKNOWN = Denial(401, "invalid API key", {"WWW-Authenticate": 'Bearer error="invalid_token"'})


class OriginPolicy:
    """Which browser origins may open a WebSocket (against cross-site WebSocket hijacking).

    A handshake without ``Origin`` comes from a non-browser client and is allowed; the key
    check covers it. A browser page of the service's own origin is allowed; any other origin
    only when listed, or when the list holds ``*``.

    Examples:
        >>> policy = OriginPolicy(["https://dash.example.com"])
        >>> policy.allows("https://dash.example.com", "api.example.com")
        True
        >>> policy.allows("https://evil.example", "api.example.com")
        False
        >>> policy.allows("http://api.example.com", "api.example.com"), policy.allows(None, "x")
        (True, True)
    """

    def __init__(self, allowed: Iterable[str]) -> None:
        allowed = list(allowed)
        self.any = "*" in allowed
        self.allowed = {normalise_origin(o) for o in allowed if o != "*"}

    def allows(self, origin: str | None, host: str | None) -> bool:
        if origin is None or self.any:
            return True
        try:
            normal = normalise_origin(origin)
        except ValueError:
            return False  # "null" from sandboxed frames and file:// pages, or garbage
        if normal in self.allowed:
            return True
        return host is not None and normal.partition("://")[2] == host.strip().lower()


class Guard:
    """Decides whether a request may do what it asks: key, scope, rate and origin."""

    def __init__(
        self,
        keys: KeyRing,
        origins: OriginPolicy,
        rate_limit_per_s: float = 0.0,
        rate_limit_burst: int = 1,
    ) -> None:
        self.keys = keys
        self.origins = origins
        self.rate_limit_per_s = rate_limit_per_s
        self.rate_limit_burst = rate_limit_burst
        self._buckets: dict[bytes, TokenBucket] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> Guard:
        entries = [parse_key_entry(entry) for entry in settings.api_keys]
        if settings.api_keys_file is not None:
            entries += read_keys_file(settings.api_keys_file)
        return cls(
            KeyRing(entries),
            OriginPolicy(settings.allowed_origins),
            settings.rate_limit_per_s,
            settings.rate_limit_burst,
        )

    @property
    def open(self) -> bool:
        """No keys are set: every request is allowed."""
        return len(self.keys) == 0

    def on_startup(self) -> None:
        """Keep keys out of the server's log, and say once whether the service is open."""
        redact_keys_in_logs()
        if self.open:
            log.warning(
                "no API keys set (SENSORCAST_API_KEYS, SENSORCAST_API_KEYS_FILE): anyone who "
                "can reach this service may send readings and read predictions"
            )
        else:
            log.info("API keys required: %d keys configured", len(self.keys))

    def check(self, key: str | None, scope: Scope, rate_limited: bool = True) -> Denial | None:
        """None when ``key`` may use ``scope`` now, else why not (401, 403 or 429)."""
        if self.open:
            return None
        if not key:
            return _MISSING
        found = self.keys.lookup(key)
        if found is None:
            return _UNKNOWN
        digest, scopes = found
        if scope not in scopes:
            return Denial(403, f"this API key lacks the {scope.value!r} scope", {})
        if rate_limited and self.rate_limit_per_s > 0:
            wait_s = self._bucket(digest).take(time.monotonic())
            if wait_s > 0:
                retry = str(max(1, math.ceil(wait_s)))
                return Denial(429, "rate limit exceeded for this API key", {"Retry-After": retry})
        return None

    def _bucket(self, digest: bytes) -> TokenBucket:
        bucket = self._buckets.get(digest)
        if bucket is None:
            # One bucket per configured key: the dict is bounded by the key ring.
            bucket = TokenBucket(self.rate_limit_per_s, self.rate_limit_burst, time.monotonic())
            self._buckets[digest] = bucket
        return bucket

    def check_websocket(self, websocket: WebSocket, scope: Scope) -> Denial | None:
        """The handshake check: origin first, then key (query ``key=`` or a header)."""
        headers = websocket.headers
        if not self.origins.allows(headers.get("origin"), headers.get("host")):
            return Denial(403, "origin not allowed (see SENSORCAST_ALLOWED_ORIGINS)", {})
        key = websocket.query_params.get("key") or _header_key(
            headers.get("authorization"), headers.get("x-api-key")
        )
        # Reconnecting subscribers are not rate limited: their cost is the connection.
        return self.check(key, scope, rate_limited=False)


def _header_key(authorization: str | None, api_key: str | None) -> str | None:
    if authorization:
        kind, _, credentials = authorization.partition(" ")
        if kind.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    return api_key or None


def guard_of(app: Any) -> Guard:
    guard: Guard = app.state.guard
    return guard


# auto_error=False: the guard decides, so that open mode needs no header at all. Declared as
# security schemes, they give /docs its "Authorize" button.
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: KEY")


def require(scope: Scope) -> Any:
    """A route dependency refusing requests whose key lacks ``scope`` (401, 403, 429).

    Use it as ``dependencies=[require(Scope.ingest)]`` on a route or router.
    """

    async def check_key(
        request: Request,
        bearer: HTTPAuthorizationCredentials | None = Security(_bearer),  # noqa: B008
        api_key: str | None = Security(_api_key),  # noqa: B008
    ) -> None:
        guard = guard_of(request.app)
        if guard.open:
            return
        key = bearer.credentials if bearer is not None else api_key
        denial = guard.check(key, scope)
        if denial is not None:
            if scope is Scope.ingest:
                count_refusal(request, REFUSAL_BY_STATUS.get(denial.status, str(denial.status)))
            raise HTTPException(denial.status, denial.detail, headers=denial.headers or None)

    return Depends(check_key)


def websocket_denial(websocket: WebSocket, scope: Scope) -> Denial | None:
    """The handshake check for a WebSocket route; deny before ``accept`` when not None."""
    return guard_of(websocket.app).check_websocket(websocket, scope)
