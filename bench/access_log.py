"""What the access log costs on the ingest path: single-reading POSTs with it on and off.

Two measurements:

- ``--micro``: CPU time per request of ``RequestIdMiddleware`` in process (no server, no
  network), bare app vs middleware without and with the access line, text and JSON, lines
  written to /dev/null. CPU time rather than wall time, so a busy machine blurs it less.
- default: starts ``sensorcast serve`` twice per round (access_log on, then off; lines go to
  a file), drives each with wrk for a few seconds and prints requests/s. Alternating rounds
  keeps a shared machine's drift out of the comparison, but on a loaded machine expect noise.

    .venv/bin/python bench/access_log.py --micro
    .venv/bin/python bench/access_log.py [--rounds 3] [--seconds 5] [--connections 32]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from app.logs import RequestIdMiddleware, configure_logging

ROOT = Path(__file__).resolve().parent.parent
LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"sensor_id": "bench-1", "value": 21.5}'
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run(access: bool, seconds: int, connections: int, tmp: Path) -> float:
    port = free_port()
    env = {
        **os.environ,
        "SENSORCAST_PORT": str(port),
        "SENSORCAST_WORKERS": "1",
        "SENSORCAST_LOG_LEVEL": "info",
        "SENSORCAST_ACCESS_LOG": str(access).lower(),
    }
    log = (tmp / f"serve-{port}.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "app", "serve"], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        script = tmp / "post.lua"
        script.write_text(LUA)
        command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script)]
        out = subprocess.run(
            [*command, f"{url}/v1/readings"], capture_output=True, text=True, check=True
        ).stdout
        match = re.search(r"Requests/sec:\s+([\d.]+)", out)
        assert match, out
        return float(match.group(1))
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


async def _bare(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 202, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def _cpu_us_per_call(app: Any, n: int = 50_000) -> float:
    scope = {"type": "http", "method": "POST", "path": "/v1/readings",
             "headers": [(b"host", b"x"), (b"content-type", b"application/json")]}  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        return None

    started = time.process_time()
    for _ in range(n):
        await app(dict(scope), receive, send)
    return (time.process_time() - started) / n * 1e6


async def micro(devnull: Any) -> None:
    for fmt in ("text", "json"):
        configure_logging("info", fmt)
        handler = logging.getLogger().handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(devnull)
        bare = await _cpu_us_per_call(_bare)
        quiet = await _cpu_us_per_call(RequestIdMiddleware(_bare, access=False))
        loud = await _cpu_us_per_call(RequestIdMiddleware(_bare, access=True))
        print(
            f"{fmt:4}: request id {quiet - bare:.1f} us/request, "
            f"access line {loud - quiet:.1f} us/request (CPU time)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--micro", action="store_true", help="in-process CPU time only")
    args = parser.parse_args()
    if args.micro:
        with Path(os.devnull).open("w") as devnull:
            asyncio.run(micro(devnull))
        return
    results: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for access in (True, False):
                rps = run(access, args.seconds, args.connections, Path(tmp))
                results[access].append(rps)
                print(f"access_log={str(access).lower():5}  {rps:8.0f} req/s", flush=True)
    on, off = statistics.median(results[True]), statistics.median(results[False])
    print(f"median: on {on:.0f} req/s, off {off:.0f} req/s, cost {100 * (1 - on / off):.1f}%")


if __name__ == "__main__":
    main()
