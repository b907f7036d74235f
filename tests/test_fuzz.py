"""Hostile input: no body yields a 5xx, the service stays up, and the readings accepted around
the hostile ones are all predicted.

Property-based (hypothesis on the parsers and over HTTP, schemathesis from the OpenAPI
schema) and hand-written bodies.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import msgspec
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings, strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from websockets.sync.client import connect as connect_sync

from app.config import Settings
from app.main import create_app
from app.schemas import (
    MAX_EPOCH_S,
    BodyError,
    InvalidItems,
    Limits,
    Reading,
    TooLarge,
    json_steps,
    parse_json,
    parse_ndjson,
)
from tests.conftest import Server, start_server

JSON = "application/json"
NDJSON = "application/x-ndjson"
REFUSALS = {400, 413, 415, 422}
FAST = settings(
    deadline=None,
    database=None,
    phases=[Phase.generate],
    suppress_health_check=list(HealthCheck),
)


@schemathesis.serializer(NDJSON)
def _ndjson(ctx: Any, value: Any) -> bytes | None:
    # The schema describes an NDJSON body as a string; send it as it is.
    return value.encode("utf-8", "surrogatepass") if isinstance(value, str) else None


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server for hostile traffic, with limits small enough to reach cheaply."""
    srv = start_server(
        tmp_path_factory.mktemp("fuzz"),
        {
            "SENSORCAST_WORKERS": "1",
            "SENSORCAST_MAX_BODY_BYTES": str(1024 * 1024),
            "SENSORCAST_MAX_READINGS_PER_REQUEST": "1000",
        },
    )
    yield srv
    assert srv.proc.poll() is None, "the server died"
    assert srv.stop() == 0
    assert "Traceback" not in srv.log()


# Strategies: readings that are plausible, hostile, or both.

numbers = st.one_of(
    st.floats(),  # NaN and infinities included: json.dumps writes them as literals
    st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from([0, -0.0, 1e308, -1e308, 5e-324, 2**63, -(2**63) - 1]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=20))
documents = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
zones = st.sampled_from([UTC, timezone(timedelta(hours=14)), timezone(timedelta(hours=-14))])
timestamps = st.one_of(
    st.none(),
    numbers,
    st.datetimes(timezones=zones).map(datetime.isoformat),
    st.datetimes().map(datetime.isoformat),  # no offset: refused
    st.text(max_size=30),
)
sensor_ids = st.one_of(
    st.sampled_from(["fz-a", "fz-b", "fz:c.d_e"]),
    st.from_regex(r"\A[A-Za-z0-9_.:-]{1,140}\Z"),
    st.text(max_size=12),
    numbers,
)
channels = st.dictionaries(
    st.one_of(st.from_regex(r"\A[a-z]{1,3}\Z"), st.text(max_size=70)),
    st.one_of(numbers, scalars),
    max_size=35,
)
hostile_readings = st.fixed_dictionaries(
    {},
    optional={
        "sensor_id": sensor_ids,
        "value": st.one_of(numbers, scalars),
        "values": st.one_of(channels, documents),
        "ts": timestamps,
        "id": st.one_of(st.text(max_size=12), st.text(min_size=120, max_size=140), scalars),
        "colour": documents,
    },
)
valid_readings = st.fixed_dictionaries(
    {
        "sensor_id": st.sampled_from(["fz-a", "fz-b", "fz:c.d_e"]),
        "value": st.floats(allow_nan=False, allow_infinity=False),
    },
    optional={
        "id": st.text(st.characters(codec="utf-8", categories=["L", "N", "P"]), max_size=10),
        "ts": st.one_of(
            st.floats(0, 1e10),
            st.datetimes(datetime(1971, 1, 1), timezones=zones).map(datetime.isoformat),
        ),
    },
)
readings = st.one_of(valid_readings, hostile_readings)
payloads = st.one_of(readings, st.lists(readings, max_size=6), documents)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, str]:
    """A body and its content type: JSON or NDJSON, sometimes damaged or mislabelled."""
    payload = draw(payloads)
    ensure_ascii = draw(st.booleans())

    def dumps(doc: Any) -> bytes:
        return json.dumps(doc, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")

    if draw(st.booleans()):
        body, content_type = dumps(payload), JSON
    else:
        items = payload if isinstance(payload, list) else [payload]
        blanks = st.sampled_from([b"", b" ", b"\r", b"\t "])
        lines = [
            line for item in items for line in (dumps(item), *draw(st.lists(blanks, max_size=2)))
        ]
        body, content_type = b"\n".join(lines), NDJSON
    damage = draw(st.sampled_from([None, None, None, "truncate", "append", "byte"]))
    if damage == "truncate" and body:
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif damage == "append":
        body += draw(st.binary(min_size=1, max_size=8))
    elif damage == "byte" and body:
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + draw(st.binary(min_size=1, max_size=1)) + body[at + 1 :]
    content_type = draw(
        st.sampled_from(
            [content_type] * 6
            + [f"{content_type}; charset=utf-8", content_type.upper(), "text/plain", "", "a/b/c"]
        )
    )
    return body, content_type


# The parsers: only their three errors, whatever the input.


def check_parsed(readings: list[Reading], limits: Limits) -> None:
    """What the rest of the pipeline relies on, for every reading a parser lets through."""
    encoder = msgspec.json.Encoder()
    for r in readings:
        assert 1 <= len(r.sensor_id) <= limits.max_sensor_id_chars
        assert r.id is None or (len(r.id) <= limits.max_reading_id_chars and r.id.isprintable())
        assert 1 <= len(r.values) == len(r.channels) <= limits.max_channels
        assert all(math.isfinite(v) for v in r.values)
        assert 0 <= r.ts <= MAX_EPOCH_S
        datetime.fromtimestamp(r.ts, UTC)
        encoder.encode([r.sensor_id, r.id, r.channels])  # what the worker will encode


@pytest.mark.parametrize("parse", [parse_json, parse_ndjson])
def test_parsers_raise_only_their_own_errors(parse: Callable[..., list[Reading]]) -> None:
    """Any bytes: the parser returns valid readings or raises BodyError, TooLarge or
    InvalidItems, never anything else."""
    limits = Limits(max_channels=4, max_sensor_id_chars=20, max_reading_id_chars=16)

    @settings(FAST, max_examples=800, phases=[Phase.generate, Phase.shrink])
    @given(request=bodies() | st.tuples(st.binary(max_size=200), st.just(JSON)))
    def check(request: tuple[bytes, str]) -> None:
        try:
            parsed = parse(request[0], max_items=5, limits=limits)
        except (BodyError, TooLarge, InvalidItems) as exc:
            assert str(exc) and "Traceback" not in str(exc)
        else:
            check_parsed(parsed, limits)

    check()


def test_json_steps_give_what_parse_json_gives() -> None:
    """Parsed in steps of 2 readings, any body gives the same readings, or the same error
    with every bad item listed, as in one go (the service parses large bodies in steps)."""

    def outcome(parse: Callable[[], list[Reading]]) -> object:
        try:
            return [(r.sensor_id, r.id, r.ts, r.channels, r.values) for r in parse()]
        except InvalidItems as exc:
            return [(e.index, e.field, e.reason) for e in exc.errors]
        except (BodyError, TooLarge) as exc:
            return str(exc)

    @settings(FAST, max_examples=400)
    @given(request=bodies())
    def check(request: tuple[bytes, str]) -> None:
        body, now = request[0], 1_700_000_000.0
        whole = outcome(lambda: parse_json(body, max_items=8, now=now))
        steps = json_steps(body, max_items=8, now=now, step=2)
        assert outcome(lambda: [r for step in steps for r in step]) == whole

    check()


# Over HTTP, against a real server.


def latest_seq(srv: Server) -> int:
    with connect_sync(srv.ws_url, open_timeout=10) as ws:
        hello = json.loads(ws.recv(timeout=10))
    seq: int = hello["seq"]
    return seq


def predictions_since(srv: Server, seq: int, expected: int) -> list[dict[str, Any]]:
    """Every prediction published after ``seq``: waits for ``expected``, then a quiet second."""
    got: list[dict[str, Any]] = []
    with connect_sync(f"{srv.ws_url}?since={seq}&batch=true", max_size=None) as ws:
        deadline = time.monotonic() + 60
        quiet_until = None
        while True:
            now = time.monotonic()
            if len(got) >= expected:
                quiet_until = quiet_until or now + 1.0
                if now >= quiet_until:
                    return got
            assert now < deadline, f"received {len(got)} of {expected} predictions"
            try:
                message = json.loads(ws.recv(timeout=0.2))
            except TimeoutError:
                continue
            assert message["type"] not in {"gap", "lagged"}, message
            items = message["items"] if message["type"] == "predictions" else [message]
            got += [m for m in items if m["type"] == "prediction"]


def assert_refusal_is_clean(r: httpx.Response) -> None:
    assert r.status_code < 500, r.text
    if r.text == "Invalid HTTP request received.":
        return  # refused by uvicorn's HTTP parser, before the app
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert isinstance(body["detail"], str) and body["detail"]
    assert "Traceback" not in r.text and 'File "' not in r.text


def test_fuzzed_bodies_never_5xx_and_accepted_ones_are_predicted(target: Server) -> None:
    """Hypothesis-made bodies over HTTP: each gets 202 or a clean 4xx, and the server predicts
    exactly the readings it acknowledged."""
    start = latest_seq(target)
    accepted = 0
    statuses: set[int] = set()

    with httpx.Client(base_url=target.url, timeout=30) as client:

        @settings(FAST, max_examples=400)
        @given(request=bodies())
        def post(request: tuple[bytes, str]) -> None:
            nonlocal accepted
            body, content_type = request
            headers = {"content-type": content_type} if content_type else {}
            r = client.post("/v1/readings", content=body, headers=headers)
            statuses.add(r.status_code)
            if r.status_code == 202:
                accepted += r.json()["accepted"]
            else:
                assert r.status_code in REFUSALS, (r.status_code, r.text, body[:200])
                assert_refusal_is_clean(r)

        post()
        assert client.get("/healthz").status_code == 200
    assert {202, 400, 422} <= statuses, statuses
    assert len(predictions_since(target, start, accepted)) == accepted


def raw(text: str) -> bytes:
    return text.encode()


def hostile_bodies(t: str) -> list[tuple[str, bytes, str, int]]:
    """(what, body, content type, expected status); sensor ids start with ``t``."""
    ok = f'"sensor_id": "{t}-x", '
    deep = 100_000
    return [
        ("deep nesting", b"[" * deep + b"]" * deep, JSON, 400),
        (
            "deep nesting in a value",
            raw("{" + ok + '"value": ') + b"[" * deep + b"]" * deep + b"}",
            JSON,
            400,
        ),  # fmt: skip
        ("deep nesting in NDJSON", b"{}\n" + b"[" * deep + b"]" * deep, NDJSON, 400),
        ("1e999", raw("{" + ok + '"value": 1e999}'), JSON, 422),
        ("-1e999 in values", raw("{" + ok + '"values": {"a": -1e999}}'), JSON, 422),
        ("NaN literal", raw("{" + ok + '"value": NaN}'), JSON, 422),
        ("Infinity literal", raw("{" + ok + '"value": Infinity}'), JSON, 422),
        ("-Infinity in NDJSON", raw("{" + ok + '"value": -Infinity}'), NDJSON, 422),
        ("a string for a number", raw("{" + ok + '"value": "21.5"}'), JSON, 422),
        ("a boolean for a number", raw("{" + ok + '"value": true}'), JSON, 422),
        ("a string for a channel", raw("{" + ok + '"values": {"a": "1"}}'), JSON, 422),
        ("a 5000-digit integer", raw("{" + ok + '"value": ' + "9" * 5000 + "}"), JSON, 422),
        ("a 5000-digit ts", raw("{" + ok + '"value": 1, "ts": ' + "9" * 5000 + "}"), JSON, 422),
        (
            "control character in sensor_id",
            raw(f'{{"sensor_id": "{t}\\u0000", "value": 1}}'),
            JSON,
            422,
        ),  # fmt: skip
        ("control character in id", raw("{" + ok + '"value": 1, "id": "a\\u001bb"}'), JSON, 422),
        ("raw newline in id", raw("{" + ok + '"value": 1, "id": "a\nb"}'), JSON, 400),
        ("lone surrogate in id", raw("{" + ok + '"value": 1, "id": "\\ud800"}'), JSON, 422),
        ("lone surrogate in NDJSON", raw("{" + ok + '"value": 1, "id": "\\udfff"}'), NDJSON, 422),
        ("invalid UTF-8", raw("{" + ok + '"value": 1, "id": "') + b'\xff\xfe"}', JSON, 400),
        ("truncated JSON", raw("[{" + ok + '"value": 1}, {"sensor'), JSON, 400),
        ("truncated NDJSON", raw("{" + ok + '"value": 1}\n{' + ok), NDJSON, 400),
        ("trailing garbage", raw("{" + ok + '"value": 1}}}garbage'), JSON, 400),
        ("two documents", raw("{" + ok + '"value": 1} {' + ok + '"value": 2}'), JSON, 400),
        ("empty body", b"", JSON, 400),
        ("only whitespace", b" \n\t ", JSON, 400),
        ("null", b"null", JSON, 422),
        ("a bare number", b"42", JSON, 422),
        ("an array of numbers", b"[1, 2, 3]", JSON, 422),
        ("an array of arrays", b"[[], [[]]]", JSON, 422),
        (
            "a huge array of readings",
            json.dumps([{"sensor_id": f"{t}-x", "value": 1}] * 5000).encode(),
            JSON,
            413,
        ),  # fmt: skip
        ("a huge array of zeros", b"[" + b"0," * 200_000 + b"0]", JSON, 413),
        ("a body over the byte limit", b"[" + b" " * (1024 * 1024) + b"]", JSON, 413),
        (
            "NDJSON with blank and broken lines",
            raw("{" + ok + '"value": 1}\n\n  \n{"sensor_id": \n'),
            NDJSON,
            400,
        ),  # fmt: skip
        (
            "NDJSON with a bad reading",
            raw("{" + ok + '"value": 1}\n{' + ok + '"value": "x"}'),
            NDJSON,
            422,
        ),  # fmt: skip
        ("NDJSON of blank lines", b"\n \r\n\t\n", NDJSON, 422),
        ("an unknown field", raw("{" + ok + '"value": 1, "admin": true}'), JSON, 422),
        ("both value and values", raw("{" + ok + '"value": 1, "values": {"a": 1}}'), JSON, 422),
        ("neither value nor values", raw("{" + ok + '"id": "x"}'), JSON, 422),
        ("empty values", raw("{" + ok + '"values": {}}'), JSON, 422),
        (
            "33 channels",
            raw("{" + ok + '"values": ' + json.dumps({f"c{i}": i for i in range(33)}) + "}"),
            JSON,
            422,
        ),  # fmt: skip
        ("ts in milliseconds", raw("{" + ok + '"value": 1, "ts": 1764097200000}'), JSON, 422),
        (
            "ts in year 1",
            raw("{" + ok + '"value": 1, "ts": "0001-01-01T00:00:00+14:00"}'),
            JSON,
            422,
        ),  # fmt: skip
        (
            "ts without offset",
            raw("{" + ok + '"value": 1, "ts": "2026-01-01T00:00:00"}'),
            JSON,
            422,
        ),  # fmt: skip
        ("ts garbage", raw("{" + ok + '"value": 1, "ts": "yesterday"}'), JSON, 422),
        ("duplicate keys", raw("{" + ok + '"value": 1, "value": "x"}'), JSON, 422),
        ("text/plain", raw("{" + ok + '"value": 1}'), "text/plain", 415),
        ("a form", b"sensor_id=a&value=1", "application/x-www-form-urlencoded", 415),
        ("XML", b"<reading/>", "application/xml", 415),
        ("no content type", raw("{" + ok + '"value": 1}'), "", 415),
        ("a content type with junk", raw("{" + ok + '"value": 1}'), "application/json+x", 415),
        (
            "a control character in a header",
            raw("{" + ok + '"value": 1}'),
            "application/json\x7f",
            400,
        ),  # fmt: skip
    ]


def test_hostile_bodies_are_refused_and_the_readings_around_them_predicted(
    target: Server,
) -> None:
    """Each hand-written hostile body gets its 4xx with a clean JSON reason; good readings
    sent between them are each predicted once, and nothing of the hostile ones is."""
    t = uuid.uuid4().hex[:8]
    bodies = hostile_bodies(t)
    with (
        connect_sync(f"{target.ws_url}?sensor={t}-*&batch=true", max_size=None) as ws,
        httpx.Client(base_url=target.url, timeout=30) as client,
    ):
        assert json.loads(ws.recv(timeout=10))["type"] == "hello"
        sent: list[str] = []
        failures = []
        for n, (what, body, content_type, status) in enumerate(bodies):
            good = {"sensor_id": f"{t}-good", "value": float(n), "id": f"good-{n}"}
            assert client.post("/v1/readings", json=good).status_code == 202
            sent.append(f"good-{n}")
            headers = {"content-type": content_type} if content_type else {}
            r = client.post("/v1/readings", content=body, headers=headers)
            if r.status_code != status:
                failures.append(f"{what}: {r.status_code} {r.text[:200]}")
            assert_refusal_is_clean(r)
        assert not failures, "\n".join(failures)
        assert client.get("/healthz").status_code == 200
        got: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(got) < len(sent) + 1:
            try:
                message = json.loads(ws.recv(timeout=1 if len(got) >= len(sent) else 10))
            except TimeoutError:
                break
            items = message["items"] if message["type"] == "predictions" else [message]
            got += [m["id"] for m in items if m["type"] == "prediction"]
    assert got == sent


def test_schemathesis_finds_no_server_error(target: Server) -> None:
    """Schemathesis, positive and negative cases from /openapi.json: no 5xx on any route;
    POST /v1/readings answers only documented statuses with documented bodies; the readings
    it accepted are all predicted."""
    schema = schemathesis.openapi.from_url(f"{target.url}/openapi.json")
    strict = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    start = latest_seq(target)
    accepted = 0
    statuses: set[tuple[str, int]] = set()
    # Other routes belong to other modules, whose documented statuses are theirs to keep.
    runs: list[tuple[Any, list[Any], int]] = [
        (schema.include(path="/v1/readings"), strict, 200),
        (schema.exclude(path="/v1/readings"), [not_a_server_error], 60),
    ]

    def run(strategy: st.SearchStrategy[Any], checks: list[Any], examples: int) -> None:
        @settings(FAST, max_examples=examples)
        @given(case=strategy)
        def call(case: Any) -> None:
            nonlocal accepted
            response = case.call_and_validate(session=session, checks=checks)
            statuses.add((case.operation.label, response.status_code))
            if case.operation.label == "POST /v1/readings" and response.status_code == 202:
                accepted += response.json()["accepted"]

        call()

    with requests.Session() as session:
        for subset, checks, examples in runs:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                run(subset.as_strategy(generation_mode=mode), checks, examples)
    assert ("POST /v1/readings", 202) in statuses and ("POST /v1/readings", 422) in statuses
    assert len(predictions_since(target, start, accepted)) == accepted


async def test_an_unexpected_error_is_a_json_500_without_internals() -> None:
    """A bug in a route gives 500 with a JSON reason, no traceback and no exception text."""
    app = create_app(Settings(workers=1))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals at /srv/app.py line 42")

    # In process, without the lifespan: the route needs no pipeline.
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    # A loopback name: the service binds 127.0.0.1, so it serves only those (trusted_hosts).
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        r = await client.get("/boom")
    assert r.status_code == 500
    assert r.json() == {"detail": "internal error"}
    assert "secret" not in r.text and "Traceback" not in r.text


async def test_an_unexpected_error_in_the_ingest_route_is_the_same_json_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """POST /v1/readings is served ahead of the framework's error handler: a failure there
    still gives the JSON 500, with a request id, and the traceback goes to the log."""
    app = create_app(Settings(workers=1))
    # Without the lifespan there is no pipeline: the route fails as it would on a bug.
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        r = await client.post("/v1/readings", json={"sensor_id": "s", "value": 1.0})
    assert r.status_code == 500
    assert r.json() == {"detail": "internal error"}
    assert r.headers["x-request-id"]
    assert any(
        rec.exc_info and "POST /v1/readings failed" in rec.getMessage() for rec in caplog.records
    )
