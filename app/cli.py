"""The ``sensorcast`` command: serve, worker, simulate, subscribe, bench, healthcheck."""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from pydantic import ValidationError

from app.backends import TOPOLOGIES, topology_of
from app.config import Settings, describe_error
from app.logs import configure_logging
from app.models.base import ModelPathError

log = logging.getLogger("app")

Command = Callable[[argparse.Namespace], int]


def _settings(args: argparse.Namespace, names: tuple[str, ...]) -> Settings:
    """Settings from the environment, overridden by the options given on the command line."""
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    return Settings(**given)


def _fail(message: str) -> int:
    print(f"sensorcast: {message}", file=sys.stderr)
    return 2


class _DenialIsNotAnError(logging.Filter):
    """Drop uvicorn's "returned without completing handshake" after a handshake denial.

    uvicorn's websockets-sansio protocol logs it at ERROR whenever the app refuses a WebSocket
    handshake with an HTTP response (401, 403, 400), which this service does on purpose:
    anyone could fill the error log with it. The route always accepts or denies, so the
    message never means anything else here.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("ASGI callable returned without completing")


def _unwritable(path: Path) -> str | None:
    """Why models cannot be saved in ``path`` (created if missing), or None."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create {str(path)!r}: {exc.strerror}"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{str(path)!r} is not writable"
    return None


def serve(args: argparse.Namespace) -> int:
    """Run the HTTP/WebSocket service until SIGTERM or SIGINT, then drain and exit 0."""
    import uvicorn

    from app.edge import Edge, open_file_limit
    from app.main import create_app
    from app.malloc import fix_mmap_threshold

    try:
        settings = _settings(args, ("host", "port", "backend", "workers", "log_level"))
        fix_mmap_threshold()
        # Before the app sizes its connection limits from it.
        open_file_limit()
        app = create_app(settings)
    except ValidationError as exc:
        return _fail(describe_error(exc))
    except ModelPathError as exc:
        return _fail(f"SENSORCAST_MODEL: {exc}")
    except ValueError as exc:
        return _fail(str(exc))
    if settings.model_dir is not None:
        problem = _unwritable(settings.model_dir)
        if problem:
            return _fail(f"SENSORCAST_MODEL_DIR: {problem}")
    configure_logging(settings.log_level, settings.log_format)
    edge: Edge = app.state.edge
    http_protocol, ws_protocol = edge.protocols()
    log.info(
        "limits: %d connections, %d subscribers (open files: %d)",
        edge.max_connections, edge.max_subscribers, edge.open_files,
    )  # fmt: skip
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=http_protocol,
        ws=ws_protocol,
        timeout_keep_alive=settings.keep_alive_timeout_s,  # type: ignore[arg-type]
        ws_max_size=settings.ws_max_message_bytes,
        ws_ping_interval=settings.ws_ping_interval_s,
        ws_ping_timeout=settings.ws_ping_timeout_s,
        access_log=False,  # RequestIdMiddleware writes the access lines
        log_config=None,  # configure_logging did it; keep uvicorn's dictConfig out
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s) + 1,
        lifespan="on",
    )
    logging.getLogger("uvicorn.error").addFilter(_DenialIsNotAnError())
    server = GracefulServer(config)
    server.run()
    return 0 if server.started else 1


class GracefulServer:
    """uvicorn's server with a drain step before it closes connections.

    On the first SIGTERM/SIGINT the app stops taking readings (503), finishes every accepted
    reading, delivers the predictions and closes subscribers with 1001; only then does uvicorn
    close the sockets. A second signal exits at once.
    """

    def __init__(self, config: Any) -> None:
        import uvicorn

        outer = self

        class _Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: FrameType | None) -> None:
                outer.on_signal(sig)

        self.server = _Server(config)
        self.app = config.app
        self._draining: asyncio.Task[None] | None = None

    @property
    def started(self) -> bool:
        return bool(self.server.started)

    def run(self) -> None:
        self.server.run()

    def on_signal(self, sig: int) -> None:
        server = self.server
        if self._draining is not None or not server.started:
            server.should_exit = True
            server.force_exit = self._draining is not None
            return
        # A signal handler runs in whatever context was current, often a request's: neither
        # this line nor the drain belongs to that request (its id would tag every line).
        log.info("%s: draining before exit", signal.Signals(sig).name, extra={"request_id": "-"})
        loop = asyncio.get_event_loop()
        self._draining = loop.create_task(self._drain(), context=contextvars.Context())

    async def _drain(self) -> None:
        try:
            await self.app.state.drain()
        except Exception:
            log.exception("drain failed")
        finally:
            self.server.should_exit = True


def worker(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args, ("backend", "workers", "log_level", "metrics_port", "host"))
    except ValidationError as exc:
        return _fail(describe_error(exc))
    if topology_of(settings.backend).ingest == TOPOLOGIES["memory"].ingest:
        return _fail(
            "SENSORCAST_BACKEND: the worker role needs a shared backend (redis://...); "
            "with memory:// the serve command runs the workers itself"
        )
    configure_logging(settings.log_level, settings.log_format)
    from app.malloc import fix_mmap_threshold
    from app.worker import run_worker

    fix_mmap_threshold()
    if settings.worker_nice:
        # Before any thread or process starts: they inherit it.
        try:
            os.nice(settings.worker_nice)
        except OSError:
            log.warning("cannot lower the worker's priority by %d", settings.worker_nice)
    return asyncio.run(run_worker(settings))


def healthcheck(args: argparse.Namespace) -> int:
    """Exit 0 when the role running here is healthy, 1 otherwise (for container healthchecks).

    With ``--worker``: a ``sensorcast worker`` on this host (its id starts with the host name,
    which is the container's) heartbeat in Redis within ``lease_ttl_s``; workers have no HTTP
    port. Otherwise: ``--url`` answers 200 (by default ``/healthz`` on the configured port).
    """
    try:
        settings = _settings(args, ("backend",))
    except ValidationError as exc:
        return _fail(describe_error(exc))
    if args.worker:
        if not settings.backend.startswith("redis"):
            return _fail("SENSORCAST_BACKEND: the worker role needs redis://...")
        try:
            alive = asyncio.run(_worker_heartbeats(settings))
        except Exception as exc:
            print(f"unhealthy: Redis: {exc}", file=sys.stderr)
            return 1
        if not alive:
            print(f"unhealthy: no worker on {socket.gethostname()} heartbeats", file=sys.stderr)
            return 1
        print(f"healthy: {', '.join(alive)}")
        return 0
    import httpx

    host = settings.host if settings.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    url = args.url or f"http://{host}:{settings.port}/healthz"
    try:
        status = httpx.get(url, timeout=settings.redis_timeout_s + 1).status_code
    except httpx.HTTPError as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    print(f"{'healthy' if status == 200 else 'unhealthy'}: {url}: {status}")
    return 0 if status == 200 else 1


async def _worker_heartbeats(settings: Settings) -> list[str]:
    from app.backends.redis import RedisBackend

    backend = RedisBackend(settings.backend, timeout_s=settings.redis_timeout_s)
    try:
        since_ms = int((time.time() - settings.lease_ttl_s) * 1000)
        members: list[bytes] = await backend.client.zrangebyscore(  # type: ignore[assignment]
            backend.key("workers"), since_ms, "+inf"
        )
    finally:
        await backend.disconnect()
    prefix = f"{socket.gethostname()}-"
    return [m.decode() for m in members if m.decode().startswith(prefix)]


def subscribe(args: argparse.Namespace) -> int:
    from app.subscribe import run as run_subscribe

    try:
        return asyncio.run(run_subscribe(args))
    except KeyboardInterrupt:
        return 130


def bench(args: argparse.Namespace) -> int:
    from app.benchcli import run as run_bench

    only = [name for value in args.only for name in value.split(",") if name]
    return run_bench(args.quick, only, args.out)


def simulate(args: argparse.Namespace) -> int:
    """Post simulated sensor readings with labelled anomalies to a running service."""
    from app.simulate import run as run_simulation

    if args.sensors < 1 or args.batch < 1 or args.duration <= 0 or args.channels < 1:
        return _fail("--sensors, --batch, --channels and --duration must be positive")
    if not 0 <= args.anomaly_rate <= 1:
        return _fail("--anomaly-rate must be between 0 and 1")
    try:
        return asyncio.run(run_simulation(args))
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sensorcast", description="Live predictions on sensor streams."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("serve", help="run the HTTP/WebSocket service")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--backend", help="memory:// (default) or redis://host:port/db")
    p.add_argument("--workers", type=int, help="model worker processes (default: the cores)")
    p.add_argument("--log-level", dest="log_level")
    p.set_defaults(func=serve)

    p = commands.add_parser("worker", help="run the compute role on a shared Redis backend")
    p.add_argument("--backend")
    p.add_argument("--workers", type=int)
    p.add_argument(
        "--metrics-port",
        dest="metrics_port",
        type=int,
        help="serve GET /metrics and /healthz on this port (on --host)",
    )
    p.add_argument("--host", help="the address the metrics port binds (default 127.0.0.1)")
    p.add_argument("--log-level", dest="log_level")
    p.set_defaults(func=worker)

    p = commands.add_parser(
        "simulate", help="post synthetic sensor readings with labelled anomalies to a service"
    )
    from app.simulate import add_arguments

    add_arguments(p)
    p.set_defaults(func=simulate)

    p = commands.add_parser("subscribe", help="print predictions as JSON lines")
    p.add_argument("--url", default="ws://127.0.0.1:8000/v1/ws/predictions")
    p.add_argument("--sensor", action="append", default=[], help="an id or a glob; repeatable")
    p.add_argument("--anomalies-only", action="store_true")
    p.add_argument("--since", type=int, help="resume after this seq")
    p.add_argument("--epoch", help="the epoch --since belongs to (from the hello frame)")
    p.add_argument("--batch", action="store_true", help="ask for batched frames")
    p.add_argument("--key", help="API key, where keys are set")
    p.add_argument("--count", type=int, help="exit after this many predictions")
    p.add_argument("--pretty", action="store_true", help="readable lines for people, not JSON")
    p.set_defaults(func=subscribe)

    p = commands.add_parser(
        "healthcheck", help="exit 0 if the service (or, with --worker, the worker) here is healthy"
    )
    p.add_argument("--url", help="URL that must answer 200 (default: /healthz on the port)")
    p.add_argument("--worker", action="store_true", help="check this host's worker heartbeat")
    p.add_argument("--backend", help="with --worker: the Redis workers use")
    p.set_defaults(func=healthcheck)

    p = commands.add_parser("bench", help="run the benchmarks: a table, JSON and a PNG plot")
    p.add_argument("--quick", action="store_true", help="short runs (about 2 minutes in all)")
    p.add_argument(
        "--only", action="append", default=[], help="run only these items (repeatable, or a,b)"
    )
    p.add_argument("--out", type=Path, help="where latest.json and latest.png go")
    p.set_defaults(func=bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Command = args.func
    return func(args)
