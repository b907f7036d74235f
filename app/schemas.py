"""The shapes at the edges: readings coming in, error bodies and acknowledgements going out.

Readings are decoded with msgspec straight from the raw body: it validates about five times
faster than pydantic (see ``bench/``), and ingestion is the hot path. A body that fails the
fast path is decoded again item by item so that the 422 names every bad item, not just the
first. Pydantic models describe the small response bodies for the OpenAPI schema.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any, NamedTuple

import msgspec
from pydantic import BaseModel

SENSOR_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
CHANNEL_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}$"
MAX_CHANNELS = 32
MAX_ID_CHARS = 128
"""The contract's ceilings; the settings in :class:`Limits` may only lower them."""
# Epoch seconds beyond this are almost certainly milliseconds or nanoseconds sent by mistake.
MAX_EPOCH_S = 1e11
# Longer integer literals would hit Python's int-from-string digit limit (a ValueError).
_MAX_INT_DIGITS = 300

ReadingId = Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)]
Rfc3339 = Annotated[datetime, msgspec.Meta(tz=True)]
# Sensor ids and channel names are matched against their patterns in _normalise, not by
# msgspec (see _Names); reading_schema states the patterns.
Channels = Annotated[dict[str, float], msgspec.Meta(min_length=1, max_length=MAX_CHANNELS)]
VALUE_CHANNELS: tuple[str, ...] = ("value",)


class ReadingIn(msgspec.Struct, forbid_unknown_fields=True):
    """One reading as a sensor sends it."""

    sensor_id: str
    ts: Rfc3339 | float | None = None
    value: float | None = None
    values: Channels | None = None
    id: ReadingId | None = None


class Reading(msgspec.Struct, frozen=True, gc=False, array_like=True):
    """A validated reading, as it travels through the pipeline and to the model processes.

    A struct the garbage collector does not track (its fields cannot form cycles): a request
    parses into thousands of them and a model process unpacks a batch of thousands, and as
    NamedTuples (tuple subclasses, which CPython never untracks) they made every collection
    meanwhile walk them all (when they waited in the shard queues, a pause of the event loop
    of 60-90 ms at saturation; they wait packed now). ``array_like``: packed as an array, as
    compact as a tuple.
    """

    sensor_id: str
    id: str | None
    ts: float
    channels: tuple[str, ...]
    values: tuple[float, ...]
    ingested_at: float


class Limits(NamedTuple):
    """Per-reading limits from the settings, checked after msgspec has enforced the
    contract's ceilings (which keep the schema and the fast path in C)."""

    max_channels: int = MAX_CHANNELS
    max_sensor_id_chars: int = MAX_ID_CHARS
    max_reading_id_chars: int = MAX_ID_CHARS


CONTRACT_LIMITS = Limits()


class ItemError(msgspec.Struct):
    """What is wrong with one item of a request."""

    index: int
    field: str
    reason: str


class BodyError(Exception):
    """The body does not parse (400)."""


class TooLarge(Exception):
    """The request is over a size limit (413)."""


class InvalidItems(Exception):
    """Some items are invalid (422); ``errors`` lists each of them."""

    def __init__(self, errors: list[ItemError]) -> None:
        super().__init__(f"{len(errors)} invalid readings")
        self.errors = errors


_single = msgspec.json.Decoder(ReadingIn | list[ReadingIn])
PARSE_STEP = 256
"""Readings checked in one step of :func:`json_steps`."""
_ndjson_line = msgspec.json.Decoder(ReadingIn)


def _normalise(index: int, item: ReadingIn, now: float, limits: Limits) -> Reading | ItemError:
    """Check what the type system cannot and flatten to a :class:`Reading`."""
    if not _SENSOR_IDS.ok(item.sensor_id):
        return ItemError(index, "sensor_id", SENSOR_ID_RULE.format(limits.max_sensor_id_chars))
    if len(item.sensor_id) > limits.max_sensor_id_chars:
        return ItemError(index, "sensor_id", f"at most {limits.max_sensor_id_chars} characters")
    rid = item.id
    if rid is not None:
        if len(rid) > limits.max_reading_id_chars:
            return ItemError(index, "id", f"at most {limits.max_reading_id_chars} characters")
        # Control characters and lone surrogates would reach subscribers' terminals, and a
        # lone surrogate cannot be encoded as UTF-8 at all.
        if not rid.isprintable():
            return ItemError(index, "id", "only printable characters (no control characters)")
    if (item.value is None) == (item.values is None):
        return ItemError(index, "value", "exactly one of 'value' or 'values' is required")
    if item.values is None:
        value = item.value
        assert value is not None
        if not math.isfinite(value):
            return ItemError(index, "value", "must be a finite number")
        channels: tuple[str, ...] = VALUE_CHANNELS
        values: tuple[float, ...] = (value,)
    else:
        if len(item.values) > limits.max_channels:
            return ItemError(index, "values", f"at most {limits.max_channels} channels")
        channels = tuple(item.values)
        values = tuple(item.values.values())
        for name, v in item.values.items():
            if not _CHANNELS.ok(name):
                return ItemError(index, f"values.{_shown(name)}", CHANNEL_RULE)
            if not math.isfinite(v):
                return ItemError(index, f"values.{name}", "must be a finite number")
    ts = item.ts
    if ts is None:
        stamp = now
    else:
        stamp = ts.timestamp() if isinstance(ts, datetime) else float(ts)
        # Readings outside the epoch-seconds range would break datetime conversions later on.
        if not 0 <= stamp <= MAX_EPOCH_S:
            return ItemError(
                index,
                "ts",
                "must be between 1970 and 5138: RFC 3339, or epoch seconds (not milliseconds)",
            )
    return Reading(item.sensor_id, rid, stamp, channels, values, now)


_NAME_CHARS = "letters, digits, '_', '.', ':' or '-'"
SENSOR_ID_RULE = "1 to {} characters of " + _NAME_CHARS
CHANNEL_RULE = f"a channel name is 1 to 64 characters of {_NAME_CHARS}"


class _Names:
    """Names matched against a pattern, each once: a sensor sends its id with every reading,
    and matching a regex costs more than all the rest of a reading's parse. The names that
    matched are remembered, up to ``keep`` of them (then forgotten all at once).

    ``fullmatch``: the patterns end in ``$``, which ``re`` also matches before a final
    newline, so a search would take ``"pump-7\\n"``.

    Examples:
        >>> names = _Names(SENSOR_ID_PATTERN)
        >>> names.ok("pump-7"), names.ok("pump-7"), names.ok("pump 7"), names.ok("pump-7\\n")
        (True, True, False, False)
    """

    def __init__(self, pattern: str, keep: int = 65_536) -> None:
        self.match = re.compile(pattern).fullmatch
        self.known: set[str] = set()
        self.keep = keep

    def ok(self, name: str) -> bool:
        if name in self.known:
            return True
        if self.match(name) is None:
            return False
        if len(self.known) >= self.keep:
            self.known.clear()
        self.known.add(name)
        return True


_SENSOR_IDS = _Names(SENSOR_ID_PATTERN)
_CHANNELS = _Names(CHANNEL_PATTERN)


def _shown(name: str) -> str:
    """A name as an error shows it: control characters escaped, at most 80 characters."""
    escaped = name.encode("unicode_escape").decode("ascii")
    return escaped if len(escaped) <= 80 else escaped[:77] + "..."


def _in_words(raw: dict[str, Any], field: str, reason: str) -> tuple[str, str]:
    """Restate msgspec's error on an item as the contract names it: a channel's value as
    ``values.<name>``.

    Examples:
        >>> _in_words({"values": {"ok": 1, "flow": "high"}}, "values[...]", "Expected `float`")
        ('values.flow', 'must be a number, not a string')
        >>> _in_words({"sensor_id": 7}, "sensor_id", "Expected `str`, got `int`")
        ('sensor_id', 'Expected `str`, got `int`')
    """
    channels = raw.get("values")
    if field.startswith("values[") and isinstance(channels, dict):
        for name, value in channels.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                return f"values.{_shown(name)}", f"must be a number, not {_json_kind(value)}"
    return field, reason


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _field_of(error: msgspec.ValidationError) -> tuple[str, str]:
    """Split msgspec's "reason - at `$.field`" message into (field, reason)."""
    message = str(error)
    reason, sep, where = message.rpartition(" - at `")
    if not sep:
        return "", message
    field = where.rstrip("`").removeprefix("$").lstrip(".")
    # "$[3].value" inside an item: the index is reported separately
    if field.startswith("["):
        field = field.partition("]")[2].lstrip(".")
    return field, reason


def _reject_constant(name: str) -> float:
    # Keep NaN/Infinity literals parseable so they are reported per item as 422.
    return math.nan


def _parse_int(literal: str) -> int | float:
    # A float stands in for a huge literal: it becomes infinity, reported per item as 422.
    return int(literal) if len(literal) <= _MAX_INT_DIGITS else float(literal)


def _slow_path(items: list[Any], now: float, limits: Limits) -> list[Reading]:
    """Validate item by item, collecting one error per bad item."""
    readings: list[Reading] = []
    errors: list[ItemError] = []
    for index, raw in enumerate(items):
        if not isinstance(raw, dict):
            errors.append(ItemError(index, "", "a reading must be a JSON object"))
            continue
        try:
            item = msgspec.convert(raw, ReadingIn, strict=True)
        except msgspec.ValidationError as exc:
            field, reason = _in_words(raw, *_field_of(exc))
            errors.append(ItemError(index, field, reason))
            continue
        result = _normalise(index, item, now, limits)
        if isinstance(result, ItemError):
            errors.append(result)
        else:
            readings.append(result)
    if errors:
        raise InvalidItems(errors)
    return readings


def _loads_lenient(text: bytes, what: str = "body", line: bool = False) -> Any:
    """The standard library's parser, which keeps 1e999 and NaN so they can be named per item.

    Raises:
        BodyError: naming where the text stops being JSON; never another exception.
    """
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        where = f"column {exc.colno}" if line else f"line {exc.lineno} column {exc.colno}"
        raise BodyError(f"{what} is not valid JSON: {exc.msg} at {where}") from None
    except RecursionError:
        raise BodyError(f"{what} is nested too deeply") from None
    except UnicodeDecodeError:
        raise BodyError(f"{what} is not UTF-8 text") from None
    except ValueError:
        raise BodyError(f"{what} is not valid JSON") from None


def parse_json(
    body: bytes, *, max_items: int, limits: Limits = CONTRACT_LIMITS, now: float | None = None
) -> list[Reading]:
    """Parse a JSON body: one reading or an array of readings.

    Only the three exceptions below can come out, whatever the bytes.

    Raises:
        BodyError: the body is not JSON.
        TooLarge: more than ``max_items`` readings.
        InvalidItems: some readings are invalid; every one is listed.
    """
    steps = json_steps(body, max_items=max_items, limits=limits, now=now)
    return [reading for step in steps for reading in step]


def json_steps(
    body: bytes,
    *,
    max_items: int,
    limits: Limits = CONTRACT_LIMITS,
    now: float | None = None,
    step: int = PARSE_STEP,
) -> Iterator[list[Reading]]:
    """:func:`parse_json` in steps of ``step`` readings, so a caller can let other work run
    between them; the exceptions are those of :func:`parse_json`, :class:`InvalidItems` only
    after every item was checked (no step is yielded once an item failed)."""
    now = time.time() if now is None else now
    try:
        decoded = _single.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError):
        # msgspec raises UnicodeDecodeError for invalid UTF-8 in an object key.
        decoded = None
    if decoded is None:
        raw = _loads_lenient(body)
        raw_items = raw if isinstance(raw, list) else [raw]
        if len(raw_items) > max_items:
            raise TooLarge(f"{len(raw_items)} readings in one request; the limit is {max_items}")
        yield _slow_path(raw_items, now, limits)
        return
    items = decoded if isinstance(decoded, list) else [decoded]
    if len(items) > max_items:
        raise TooLarge(f"{len(items)} readings in one request; the limit is {max_items}")
    errors: list[ItemError] = []
    for start in range(0, len(items), step):
        readings: list[Reading] = []
        for index in range(start, min(start + step, len(items))):
            result = _normalise(index, items[index], now, limits)
            if isinstance(result, ItemError):
                errors.append(result)
            else:
                readings.append(result)
        if not errors:
            yield readings
    if errors:
        raise InvalidItems(errors)


def parse_ndjson(
    body: bytes, *, max_items: int, limits: Limits = CONTRACT_LIMITS, now: float | None = None
) -> list[Reading]:
    """Parse an NDJSON body: one reading per line; blank lines are ignored.

    A line that is not JSON is a 400 naming the line; a JSON line that is not a valid reading
    is a 422 item whose ``index`` counts readings (blank lines excluded).
    """
    now = time.time() if now is None else now
    lines = [line for line in body.split(b"\n") if line.strip()]
    if len(lines) > max_items:
        raise TooLarge(f"{len(lines)} readings in one request; the limit is {max_items}")
    try:
        return [
            _checked(index, _ndjson_line.decode(line), now, limits)
            for index, line in enumerate(lines)
        ]
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, InvalidItems):
        pass
    raw_items: list[Any] = []
    for number, line in enumerate(body.split(b"\n"), start=1):
        if not line.strip():
            continue
        raw_items.append(_loads_lenient(line, f"line {number}", line=True))
    return _slow_path(raw_items, now, limits)


def ndjson_steps(body: bytes, **options: Any) -> Iterator[list[Reading]]:
    """:func:`parse_ndjson` as one step, the counterpart of :func:`json_steps`."""
    yield parse_ndjson(body, **options)


def _checked(index: int, item: ReadingIn, now: float, limits: Limits) -> Reading:
    result = _normalise(index, item, now, limits)
    if isinstance(result, ItemError):
        raise InvalidItems([result])
    return result


# Response bodies, for the OpenAPI schema.


class Accepted(BaseModel):
    accepted: int
    duplicates: int


class ErrorBody(BaseModel):
    detail: str


class ItemErrorBody(BaseModel):
    index: int
    field: str
    reason: str


class InvalidBody(BaseModel):
    detail: str
    errors: list[ItemErrorBody]


def reading_schema() -> dict[str, Any]:
    """JSON Schema of the request body, self-contained (no ``$ref``), for the OpenAPI page.

    It is derived from the msgspec types, with what :func:`_normalise` checks added where JSON
    Schema can say it, so that schema-driven clients and fuzzers produce acceptable readings.
    """
    (_, components) = msgspec.json.schema_components([ReadingIn], ref_template="{name}")
    reading: dict[str, Any] = components["ReadingIn"]
    properties = reading["properties"]
    properties["ts"]["anyOf"][1].update(minimum=0, maximum=MAX_EPOCH_S)
    properties["id"]["anyOf"][0]["pattern"] = r"^[^\u0000-\u001f\u007f]*$"
    properties["sensor_id"]["pattern"] = SENSOR_ID_PATTERN
    properties["values"]["anyOf"][0]["propertyNames"] = {"pattern": CHANNEL_PATTERN}
    # Exactly one of value or values (a null one counts as absent, as in _normalise).
    null = {"type": "null"}
    reading["oneOf"] = [
        {"required": ["value"], "properties": {"value": {"type": "number"}, "values": null}},
        {"required": ["values"], "properties": {"values": {"type": "object"}, "value": null}},
    ]
    return {"anyOf": [reading, {"type": "array", "items": reading}]}
