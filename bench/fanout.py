"""Fan-out: delivered frames/s and delivery latency to N subscribers, beside a raw ceiling.

Two servers are measured in the same run, with the same client process and frame size:

- ``sensorcast``: a real ``sensorcast serve`` (memory backend, process pool). The client
  process POSTs readings and keeps a window of ``--window`` readings in flight (posted but
  not yet received by every subscriber), so the server runs flat out without queue drops.
  Latency is receive time minus the frame's ``predicted_at`` (stamped in the worker), so it
  covers publish, the hub, the relay queue and the socket.
- ``broadcast``: the ``websockets`` library's own ``broadcast()`` of a frame of the same
  shape and size, publishing as fast as backpressure allows (paused while any connection's
  write buffer is over its high-water mark), as in the machine's ceiling measurements.

The client is a minimal frame parser on raw sockets (one process, uvloop), cheap enough that
the server is the limit. Usage::

    .venv/bin/python bench/fanout.py [--subscribers 100 1000] [--seconds 4] [--reps 1]

Each N runs saturated and then paced (``--paced``, 20,000 frames/s offered by default, as in
the machine's ceiling runs): saturated figures give the throughput ratio, paced ones a
latency that is not just the length of the backlog the saturating driver keeps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PATH = "/v1/ws/predictions"
MARK = b'"predicted_at":"'
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# The client process


class Sink:
    """What every connection of the client process received."""

    def __init__(self, n: int) -> None:
        self.counts = [0] * n
        self.latencies: list[float] = []
        self.first = 0.0
        self.last = 0.0
        self.connected = 0
        self.ended = 0


class RawSubscriber(asyncio.Protocol):
    """Handshake, then parse server frames (unmasked) and time prediction frames."""

    def __init__(self, index: int, port: int, path: str, sink: Sink) -> None:
        self.index, self.port, self.path, self.sink = index, port, path, sink
        self.buf = bytearray()
        self.open = False

    def connection_made(self, transport: Any) -> None:
        transport.write(
            b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (self.path.encode(), self.port, KEY)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.sink.ended += 1

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            assert buf.startswith(b"HTTP/1.1 101"), bytes(buf[:100])
            del buf[: end + 4]
            self.open = True
            self.sink.connected += 1
        now = time.time()
        now_of_day = now % 86400
        sink = self.sink
        off, size, count = 0, len(buf), 0
        while size - off >= 2:
            length, head = buf[off + 1] & 0x7F, 2
            if length == 126:
                if size - off < 4:
                    break
                length, head = int.from_bytes(buf[off + 2 : off + 4], "big"), 4
            elif length == 127:
                if size - off < 10:
                    break
                length, head = int.from_bytes(buf[off + 2 : off + 10], "big"), 10
            if size - off < head + length:
                break
            start = off + head
            if buf[off] & 0x0F == 1 and buf.startswith(b'{"type":"prediction"', start):
                count += 1
                if count & 3 == 1:
                    # A quarter of the frames, timed by seconds of the UTC day (cheap to parse).
                    at = buf.find(MARK, start, start + length) + len(MARK) + 11
                    stamp = (
                        int(buf[at : at + 2]) * 3600
                        + int(buf[at + 3 : at + 5]) * 60
                        + float(buf[at + 6 : at + 15])
                    )
                    sink.latencies.append((now_of_day - stamp) % 86400)
            off = start + length
        del buf[:off]
        if count:
            sink.counts[self.index] += count
            sink.first = sink.first or now
            sink.last = now


async def run_client(args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    n = args.n
    sink = Sink(n)
    gate = asyncio.Semaphore(100)
    transports = []

    async def open_one(i: int) -> None:
        async with gate:
            transport, _ = await loop.create_connection(
                lambda: RawSubscriber(i, args.port, args.path, sink), "127.0.0.1", args.port
            )
            transports.append(transport)

    await asyncio.gather(*(open_one(i) for i in range(n)))
    while sink.connected < n:  # noqa: ASYNC110 (counters bumped by protocol callbacks)
        await asyncio.sleep(0.01)
    posted = 0
    if args.mode == "sensorcast":
        posted = await drive(args, sink)
    else:
        # The ceiling server starts when all are connected and closes everyone at the end.
        deadline = time.monotonic() + args.seconds + 30
        while sink.ended < n and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    for t in transports:
        t.close()
    lat = sorted(sink.latencies)
    window = sink.last - sink.first
    received = sum(sink.counts)
    return {
        "received": received,
        "posted": posted,
        "window_s": window,
        "frames_per_s": received / window if window else 0.0,
        "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
        "p99_ms": 1000 * lat[int(len(lat) * 0.99)] if lat else None,
    }


async def drive(args: argparse.Namespace, sink: Sink) -> int:
    """POST readings, keeping ``window`` of them not yet received by every subscriber."""
    import httpx

    per_s = args.rate / args.n
    chunk = max(1, round(per_s / 100)) if args.rate else max(1, args.window // 4)
    posted = 0
    seq = 0
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{args.port}", timeout=30) as http:
        start = time.monotonic()
        end = start + args.seconds
        while time.monotonic() < end:
            if args.rate:
                due = start + posted / per_s
                if due > time.monotonic():
                    await asyncio.sleep(due - time.monotonic())
            elif posted - min(sink.counts) + chunk > args.window:
                await asyncio.sleep(0.001)
                continue
            body = [
                {"sensor_id": f"fan-{(seq + i) % 50}", "value": float((seq + i) % 13)}
                for i in range(chunk)
            ]
            seq += chunk
            r = await http.post("/v1/readings", json=body)
            r.raise_for_status()
            posted += chunk
        deadline = time.monotonic() + 10
        while min(sink.counts) < posted and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    return posted


def client_main(args: argparse.Namespace) -> None:
    import uvloop

    print("RESULT " + json.dumps(uvloop.run(run_client(args))), flush=True)


# The ceiling server


def frame_template() -> str:
    """A prediction frame of the service's shape and size, ``predicted_at`` left open."""
    return (
        '{"type":"prediction","seq":%d,"epoch":"6b0789d2-0f4b1c2a","sensor_id":"fan-17",'
        '"id":null,"ts":"2026-11-26T01:20:35.571660Z","values":{"value":7.0},'
        '"forecast":{"value":6.93},"anomaly_score":0.041,"is_anomaly":false,"status":"ok",'
        '"model_version":3,"ingested_at":"2026-11-26T01:20:35.571660Z","predicted_at":"%s"}'
    )


async def ceiling_server(args: argparse.Namespace) -> None:
    from websockets.asyncio.server import broadcast, serve

    clients: list[Any] = []
    ready = asyncio.Event()

    async def handler(ws: Any) -> None:
        clients.append(ws)
        if len(clients) >= args.n:
            ready.set()
        await ws.wait_closed()

    template = frame_template()
    async with serve(
        handler, "127.0.0.1", args.port, compression=None, ping_interval=None, backlog=4096
    ):
        print("LISTENING", flush=True)
        await ready.wait()
        await asyncio.sleep(0.3)
        conns = list(clients)
        start = time.perf_counter()
        end = start + args.seconds
        rounds_per_s = args.rate / args.n
        seq = 0
        while time.perf_counter() < end:
            if args.rate:
                due = start + seq / rounds_per_s
                if due > time.perf_counter():
                    await asyncio.sleep(due - time.perf_counter())
            seq += 1
            stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
            broadcast(conns, template % (seq, stamp))
            # As in the machine's ceiling runs: wait while any write buffer is full.
            while any(c.paused for c in conns):  # noqa: ASYNC110
                await asyncio.sleep(0.0005)
            await asyncio.sleep(0)
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)


def ceiling_main(args: argparse.Namespace) -> None:
    import uvloop

    uvloop.run(ceiling_server(args))


# The orchestrator


def wait_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def start_sensorcast(port: int, workers: int) -> subprocess.Popen[bytes]:
    import httpx

    env = {
        **os.environ,
        "SENSORCAST_PORT": str(port),
        "SENSORCAST_WORKERS": str(workers),
        "SENSORCAST_LOG_LEVEL": "warning",
    }
    proc = subprocess.Popen([sys.executable, "-m", "app", "serve"], cwd=ROOT, env=env)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("sensorcast did not become ready")


def run_client_process(
    mode: str, port: int, n: int, rate: float, args: argparse.Namespace
) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "_client", "--mode", mode, "--port", str(port), "--n", str(n),
        "--seconds", str(args.seconds), "--window", str(args.window), "--rate", str(rate),
        "--path", PATH if mode == "sensorcast" else "/",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.seconds + 120)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"client failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[0][7:])
    return result


def measure(mode: str, n: int, rate: float, args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    if mode == "sensorcast":
        server = start_sensorcast(port, args.workers)
    else:
        cmd = [sys.executable, __file__, "_ceiling", "--port", str(port), "--n", str(n),
               "--seconds", str(args.seconds), "--rate", str(rate)]  # fmt: skip
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        wait_port(port, 30)
    try:
        profiling = args.profile and mode == "sensorcast" and n == max(args.subscribers)
        if profiling and not rate:
            profile = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "-o", args.profile,
                 "-d", str(int(args.seconds) + 2), "-p", str(server.pid), "-f", "raw"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        result = run_client_process(mode, port, n, rate, args)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    if profiling and not rate:
        profile.wait(30)
    return {"server": mode, "subscribers": n, "offered": rate, **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subscribers", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--window", type=int, default=200, help="readings in flight")
    parser.add_argument("--workers", type=int, default=1, help="sensorcast model workers")
    parser.add_argument("--json", type=Path, help="write the figures here (bench/_common.py)")
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--profile", help="py-spy collapsed stacks of the largest N run")
    parser.add_argument(
        "--paced",
        type=float,
        nargs="*",
        default=[20_000.0],
        help="also run at these offered frames/s in total (latency below saturation)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        # Within the runner's quick budget: each measurement starts its own server and
        # connects every subscriber, so only the largest N (the one with targets) runs.
        args.seconds = min(args.seconds, 2.0)
        args.subscribers = [max(args.subscribers)]

    rates = [0.0, *args.paced]
    table: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for rep in range(args.reps):
        for n in args.subscribers:
            for rate in rates:
                for mode in ("broadcast", "sensorcast"):
                    r = measure(mode, n, rate, args)
                    r["rep"] = rep
                    runs.append(r)
                    print(
                        f"rep {rep} {mode:10s} N={n:5d} offered {rate or 'max':>7} "
                        f"{r['frames_per_s']:9.0f} frames/s "
                        f"p50 {r['p50_ms']:7.1f} ms p99 {r['p99_ms']:7.1f} ms",
                        file=sys.stderr,
                        flush=True,
                    )
    print(
        "| subscribers | offered frames/s | broadcast() frames/s | p50 / p99 ms "
        "| sensorcast frames/s | p50 / p99 ms | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in args.subscribers:
        for rate in rates:
            rows = {}
            for mode in ("broadcast", "sensorcast"):
                mine = [
                    r
                    for r in runs
                    if r["server"] == mode and r["subscribers"] == n and r["offered"] == rate
                ]
                rows[mode] = [
                    statistics.median(r[k] for r in mine)
                    for k in ("frames_per_s", "p50_ms", "p99_ms")
                ]
            ratios = []
            for rep in range(args.reps):
                pair = {
                    r["server"]: r["frames_per_s"]
                    for r in runs
                    if r["subscribers"] == n and r["rep"] == rep and r["offered"] == rate
                }
                ratios.append(pair["sensorcast"] / pair["broadcast"])
            (bf, b50, b99), (sf, s50, s99) = rows["broadcast"], rows["sensorcast"]
            ratio = statistics.median(ratios)
            offered = f"{rate:,.0f}/s offered" if rate else "saturated"
            row: dict[str, Any] = {
                "item": "fanout", "measure": f"{n:,} subscribers, {offered}", "value": sf,
                "unit": "frames/s", "baseline": "websockets broadcast()", "baseline_value": bf,
                "ratio": ratio,
            }  # fmt: skip
            if n == 1000 and not rate:
                row["target"], row["met"] = ">= 0.7x", ratio >= 0.7
            table.append(row)
            latency: dict[str, Any] = {
                "item": "fanout", "measure": f"{n:,} subscribers, {offered}: p99 delivery",
                "value": s99, "unit": "ms", "baseline": "websockets broadcast()",
                "baseline_value": b99, "ratio": s99 / b99 if b99 else None,
            }  # fmt: skip
            if n == 1000 and rate:
                latency["target"] = "<= 3.0x"
                latency["met"] = bool(b99) and s99 <= 3 * b99
            table.append(latency)
            print(
                f"| {n:,} | {f'{rate:,.0f}' if rate else 'saturated'} | {bf:,.0f} "
                f"| {b50:.1f} / {b99:.1f} | {sf:,.0f} | {s50:.1f} / {s99:.1f} "
                f"| {statistics.median(ratios):.2f} |"
            )
    if args.json:
        args.json.write_text(json.dumps({"rows": table, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("_client", "_ceiling"):
        sub = argparse.ArgumentParser()
        sub.add_argument("--mode", default="broadcast")
        sub.add_argument("--port", type=int, required=True)
        sub.add_argument("--n", type=int, required=True)
        sub.add_argument("--seconds", type=float, default=4.0)
        sub.add_argument("--window", type=int, default=200)
        sub.add_argument("--rate", type=float, default=0.0)
        sub.add_argument("--path", default="/")
        ns = sub.parse_args(sys.argv[2:])
        (client_main if sys.argv[1] == "_client" else ceiling_main)(ns)
    else:
        sys.exit(main())
