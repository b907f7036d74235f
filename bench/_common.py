"""What the benchmark scripts share: the script convention, servers on loopback, HTTP load.

The convention every ``bench/`` script follows, so that ``sensorcast bench`` can run it:

- it runs as ``python -m bench.NAME [--quick] [--json PATH]`` from the project's root;
- it prints human-readable lines as it goes;
- with ``--json PATH`` it writes its figures as ``{"rows": [...], "series": {...}}``, each row
  ``{"item", "measure", "value", "unit"}`` plus, for a comparison, ``"baseline"`` (what it is
  compared with), ``"baseline_value"``, ``"ratio"``, and where the project sets one,
  ``"target"`` (text such as ``">= 1.0x"``) and ``"met"`` (true or false);
  ``series`` holds curves to plot, ``{"name": {"x": [...], "y": [...], "xlabel", "ylabel"}}``;
- ``--quick`` keeps the whole script within about 30 seconds.

Every load generator targets 127.0.0.1 only and is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from app.benchcli import fmt

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="short runs (about 30 s in all)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    return parser.parse_args()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(len(ordered) * q / 100))
    return ordered[rank - 1]


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


@dataclass
class Results:
    """The figures of one script, printed as they come and written with ``--json``."""

    script: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    series: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    """Anything else worth keeping (per-item figures, say), written as ``details``."""

    def row(
        self,
        item: str,
        measure: str,
        value: float,
        unit: str,
        *,
        baseline: str | None = None,
        baseline_value: float | None = None,
        ratio_value: float | None = None,
        target: str | None = None,
        met: bool | None = None,
    ) -> None:
        row: dict[str, Any] = {"item": item, "measure": measure, "value": value, "unit": unit}
        if baseline is not None:
            row["baseline"] = baseline
            row["baseline_value"] = baseline_value
            if ratio_value is None and baseline_value is not None:
                ratio_value = ratio(value, baseline_value)
            row["ratio"] = ratio_value
        if target is not None:
            row["target"] = target
            row["met"] = met
        self.rows.append(row)
        line = f"{item:14s} {measure:48s} {fmt(value):>10s} {unit}"
        if baseline is not None:
            line += f"  vs {baseline} {fmt(baseline_value)}: {fmt(ratio_value)}x"
        if target is not None:
            line += f"  [target {target}: {'met' if met else 'MISSED'}]"
        print(line, flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"note: {text}", flush=True)

    def write(self, path: Path | None) -> None:
        if path is None:
            return
        data = {"script": self.script, "rows": self.rows, "series": self.series}
        data["notes"] = self.notes
        if self.details:
            data["details"] = self.details
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, default=_nan_to_none))


def _nan_to_none(value: object) -> object:
    return None


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user and system) a process has used so far, all its threads."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


async def websocket_handshake(
    port: int,
    path_and_query: str = "/v1/ws/predictions",
    *,
    host: str | None = None,
    rcvbuf: int | None = None,
    timeout_s: float = 10.0,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Open a connection to ``HOST:port`` and send a WebSocket opening handshake on a plain
    socket; returns the streams and the response head (status line and headers), whatever
    the status, for a peer that then does only what its caller decides.

    ``host`` is the Host header (``HOST:port`` by default); ``rcvbuf`` shrinks the socket's
    receive buffer, set before connecting so that the TCP window stays small.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET {path_and_query} HTTP/1.1\r\nHost: {host or f'{HOST}:{port}'}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
    return reader, writer, head


@dataclass
class Server:
    """A server subprocess on a loopback port."""

    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{HOST}:{self.port}/v1/ws/predictions"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def _wait_ready(server: Server, path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.url + path, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server not ready within {timeout_s} s:\n{server.log_tail()}")


@contextmanager
def _running(
    cmd: list[str], env: dict[str, str], port: int, ready_path: str, cwd: Path = ROOT
) -> Iterator[Server]:
    log_dir = Path(os.environ.get("SENSORCAST_BENCH_LOGS", "/tmp"))
    log_path = log_dir / f"sensorcast-bench-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = Server(port, proc, log_path)
    try:
        _wait_ready(server, ready_path, 90)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@contextmanager
def service(**settings: str | int | float) -> Iterator[Server]:
    """``sensorcast serve`` on a free loopback port with ``SENSORCAST_*`` settings, ready."""
    port = free_port()
    env = {
        **os.environ,
        "SENSORCAST_HOST": HOST,
        "SENSORCAST_PORT": str(port),
        "SENSORCAST_LOG_LEVEL": "warning",
        **{f"SENSORCAST_{k.upper()}": str(v) for k, v in settings.items()},
    }
    with _running([sys.executable, "-m", "app", "serve"], env, port, "/readyz") as server:
        yield server


@contextmanager
def reference_app(app: str = "bench._reference:app") -> Iterator[Server]:
    """A reference ASGI app under uvicorn as the service runs (uvloop, httptools, no log)."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "uvicorn", app, "--host", HOST, "--port", str(port),
        "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    with _running(cmd, dict(os.environ), port, "/healthz") as server:
        yield server


# ---------------------------------------------------------------------------------------------
# HTTP load


@dataclass
class Load:
    """What a closed-loop HTTP load run measured."""

    tool: str
    requests: int
    duration_s: float
    non_2xx: int
    errors: int
    p50_ms: float
    p99_ms: float
    refused: int = 0
    """Of ``non_2xx``: answered 503 (the pipeline could not take the request now)."""

    @property
    def rps(self) -> float:
        """Requests answered per second, whatever the answer."""
        return self.requests / self.duration_s if self.duration_s else math.nan

    @property
    def ok_rps(self) -> float:
        """Requests accepted (2xx) per second: the only ones that count as ingested."""
        return (self.requests - self.non_2xx) / self.duration_s if self.duration_s else math.nan

    @property
    def refused_rps(self) -> float:
        """Requests refused with 503 per second."""
        return self.refused / self.duration_s if self.duration_s else math.nan


def load_tool() -> str:
    """``wrk`` when installed, else ``httpx`` (a Python client: much slower, client-bound)."""
    return "wrk" if shutil.which("wrk") else "httpx"


_RESULT = re.compile(
    r"RESULT requests=(\d+) duration_s=([\d.]+) non_2xx=(\d+) errors=(\d+) "
    r"p50_ms=([\d.]+) p99_ms=([\d.]+) refused=(\d+)"
)


def post_load(
    url: str,
    body: bytes,
    *,
    connections: int,
    duration_s: float,
    content_type: str = "application/json",
) -> Load:
    """POST ``body`` to ``url`` from ``connections`` keep-alive connections for ``duration_s``.

    Closed loop: each connection sends its next request when the previous one is answered.
    Uses wrk (one thread) when installed, else an httpx client in this process. The load
    generator shares the machine's cores with the server it measures.
    """
    if not url.startswith(f"http://{HOST}:"):
        raise ValueError("load generators target 127.0.0.1 only")
    if load_tool() == "wrk":
        return _wrk(url, body, connections, duration_s, content_type)
    return asyncio.run(_httpx_load(url, body, connections, duration_s, content_type))


def _wrk(url: str, body: bytes, connections: int, duration_s: float, content_type: str) -> Load:
    body_path = Path(f"/tmp/sensorcast-bench-body-{os.getpid()}.json")
    body_path.write_bytes(body)
    env = {**os.environ, "BODY": str(body_path), "CONTENT_TYPE": content_type}
    seconds = max(1, round(duration_s))
    try:
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
             "-s", str(HERE / "post.lua"), url],
            env=env, capture_output=True, text=True, timeout=seconds + 30,
        )  # fmt: skip
    finally:
        body_path.unlink(missing_ok=True)
    m = _RESULT.search(out.stdout)
    if not m:
        raise RuntimeError(f"wrk gave no result:\n{out.stdout[-1000:]}\n{out.stderr[-1000:]}")
    return Load(
        "wrk", int(m[1]), float(m[2]), int(m[3]), int(m[4]), float(m[5]), float(m[6]), int(m[7])
    )


async def _httpx_load(
    url: str, body: bytes, connections: int, duration_s: float, content_type: str
) -> Load:
    latencies: list[float] = []
    counts = {"non_2xx": 0, "errors": 0, "refused": 0}
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    headers = {"content-type": content_type}
    async with httpx.AsyncClient(limits=limits, timeout=5) as client:
        end = time.perf_counter() + duration_s

        async def one_connection() -> None:
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                try:
                    r = await client.post(url, content=body, headers=headers)
                except httpx.HTTPError:
                    counts["errors"] += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                if not 200 <= r.status_code < 300:
                    counts["non_2xx"] += 1
                    counts["refused"] += r.status_code == 503

        started = time.perf_counter()
        await asyncio.gather(*(one_connection() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    ms = [x * 1e3 for x in latencies]
    return Load(
        "httpx", len(ms), elapsed, counts["non_2xx"], counts["errors"],
        percentile(ms, 50), percentile(ms, 99), counts["refused"],
    )  # fmt: skip


def readings_body(count: int, sensors: int, *, stamp: float | None = None) -> bytes:
    """A JSON body of ``count`` single-value readings spread over ``sensors`` sensors.

    Without ``stamp`` the readings carry no ``ts`` (the service stamps the receive time): a
    body posted over and over with fixed timestamps would make every reading after the first
    request older than its sensor's latest, and measure the models' late-reading path.
    """
    import random

    rng = random.Random(1)
    items: list[dict[str, object]] = [
        {"sensor_id": f"s-{i % sensors:04d}", "value": round(20 + rng.gauss(0, 1), 3)}
        for i in range(count)
    ]
    if stamp is not None:
        for i, item in enumerate(items):
            item["ts"] = round(stamp + i * 0.01, 3)
    return json.dumps(items[0] if count == 1 else items, separators=(",", ":")).encode()


async def paced_posts(
    client: httpx.AsyncClient,
    url: str,
    *,
    requests_per_s: float,
    duration_s: float,
    body: Callable[[int], bytes],
    max_in_flight: int = 64,
) -> dict[str, float]:
    """Open-loop load: POST ``body(n)`` at a fixed rate for ``duration_s`` seconds.

    Requests are sent on schedule whatever the answers, up to ``max_in_flight`` at once (a
    stalled server makes the generator fall behind rather than pile up without bound).
    Returns counts of sent, 2xx, non-2xx and failed requests.
    """
    if not url.startswith(f"http://{HOST}:"):
        raise ValueError("load generators target 127.0.0.1 only")
    counts = {"sent": 0, "ok": 0, "non_2xx": 0, "errors": 0}
    slots = asyncio.Semaphore(max_in_flight)
    headers = {"content-type": "application/json"}

    async def one(n: int) -> None:
        try:
            r = await client.post(url, content=body(n), headers=headers)
            counts["ok" if 200 <= r.status_code < 300 else "non_2xx"] += 1
        except httpx.HTTPError:
            counts["errors"] += 1
        finally:
            slots.release()

    tasks: set[asyncio.Task[None]] = set()
    started = time.perf_counter()
    n = 0
    while (now := time.perf_counter()) < started + duration_s:
        due = started + n / requests_per_s
        if due > now:
            await asyncio.sleep(due - now)
        await slots.acquire()
        task = asyncio.create_task(one(n))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
        counts["sent"] += 1
    if tasks:
        await asyncio.wait(tasks, timeout=10)
    return {k: float(v) for k, v in counts.items()}


async def probe_latency(
    client: httpx.AsyncClient, url: str, *, interval_s: float, stop: asyncio.Event
) -> list[float]:
    """GET ``url`` every ``interval_s`` until ``stop`` is set; the latencies in ms."""
    latencies: list[float] = []
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            await client.get(url)
            latencies.append((time.perf_counter() - t0) * 1e3)
        except httpx.HTTPError:
            latencies.append(math.inf)
        rest = interval_s - (time.perf_counter() - t0)
        if rest > 0:
            await asyncio.sleep(rest)
    return latencies
