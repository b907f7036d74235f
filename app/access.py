"""API keys, their scopes and browser origins, as the settings spell them.

At the bottom of the service's imports: the settings validate with these, and the API's
guard (``app/api/auth.py``) builds on them.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

MIN_KEY_CHARS = 16
_KEY = re.compile(rf"[A-Za-z0-9._~-]{{{MIN_KEY_CHARS},256}}")


class Scope(StrEnum):
    """What a key may do."""

    ingest = "ingest"
    """POST /v1/readings."""
    subscribe = "subscribe"
    """The predictions WebSocket and GET /v1/sensors."""
    ack = "ack"
    """POST /v1/alarms/{alarm_id}/ack."""
    admin = "admin"
    """/metrics; implies the other scopes."""


ALL_SCOPES = frozenset(Scope)


def parse_key_entry(entry: str) -> tuple[str, frozenset[Scope]]:
    """Split ``KEY`` or ``KEY:SCOPE+SCOPE`` into the key and its scopes.

    Error messages never repeat the key.

    Examples:
        >>> key, scopes = parse_key_entry("k1-0123456789abcdef:ingest+subscribe")
        >>> sorted(scope.value for scope in scopes)
        ['ingest', 'subscribe']
        >>> parse_key_entry("k2-0123456789abcdef:admin")[1] == ALL_SCOPES
        True
        >>> parse_key_entry("short:ingest")
        Traceback (most recent call last):
        ...
        ValueError: a key must be 16 to 256 characters of A-Z a-z 0-9 . _ ~ -

    Raises:
        ValueError: the entry is malformed.
    """
    key, sep, scope_list = entry.strip().partition(":")
    if not _KEY.fullmatch(key):
        raise ValueError(f"a key must be {MIN_KEY_CHARS} to 256 characters of A-Z a-z 0-9 . _ ~ -")
    if not sep:
        return key, ALL_SCOPES
    scopes: set[Scope] = set()
    for name in scope_list.split("+"):
        name = name.strip()
        if name not in Scope.__members__:
            known = ", ".join(Scope)
            raise ValueError(f"unknown scope {name[:20]!r} (scopes: {known}, joined with +)")
        scopes.add(Scope(name))
    return key, ALL_SCOPES if Scope.admin in scopes else frozenset(scopes)


def read_keys_file(path: Path) -> list[tuple[str, frozenset[Scope]]]:
    """The entries of a keys file: one per line; blank lines and ``#`` comments are skipped.

    Raises:
        ValueError: the file cannot be read or a line is malformed (named by number).
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.partition("#")[0].strip()
        if not line:
            continue
        try:
            entries.append(parse_key_entry(line))
        except ValueError as exc:
            raise ValueError(f"{path} line {number}: {exc}") from None
    return entries


def normalise_origin(origin: str) -> str:
    """``scheme://host[:port]`` in lower case, as browsers send it in ``Origin``.

    Raises:
        ValueError: not an http(s) origin.
    """
    parts = urlsplit(origin.strip().lower())
    if parts.scheme not in {"http", "https"} or not parts.netloc or parts.path not in {"", "/"}:
        raise ValueError(f"{origin!r} is not an origin such as https://example.com:8443")
    return f"{parts.scheme}://{parts.netloc}"
