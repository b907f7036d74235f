"""A latency prober, run as its own process by ``bench/saturation.py``.

``python -m bench._prober URL --start T0 --end T1`` GETs ``URL`` every 10 ms on one keep-alive
connection and prints one ``RESULT {json}`` line with the p50, p99 and max latency (ms) of the
probes sent between the epoch times T0 and T1. A probe that fails or takes over 5 s counts as
5 s, so a stalled service cannot look healthy; after a failure the prober reconnects.

The requests are written and their responses read on a plain socket: an HTTP client library
costs about a millisecond of CPU per request, which at 100 probes a second is a tenth of a
core taken from the service it measures on a 2-core machine, and adds its own time to every
latency. The service answers ``/healthz`` with a ``Content-Length``, which is all this reads.
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from urllib.parse import urlsplit

from bench._common import percentile

INTERVAL_S = 0.01
TIMEOUT_S = 5.0


class Probe:
    """One keep-alive HTTP/1.1 connection that GETs one path."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self.address = (host, port)
        self.request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
        self.sock: socket.socket | None = None
        self.buffer = b""

    def get(self) -> int:
        """The status of one GET; raises OSError (or ValueError for a garbled reply)."""
        if self.sock is None:
            self.sock = socket.create_connection(self.address, timeout=TIMEOUT_S)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.buffer = b""
        self.sock.sendall(self.request)
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(self.buffer) < length:
            self._read()
        self.buffer = self.buffer[length:]
        return status

    def _read(self) -> None:
        assert self.sock is not None
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk

    def reset(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--start", type=float, required=True)
    parser.add_argument("--end", type=float, required=True)
    args = parser.parse_args()
    if not args.url.startswith(("http://127.0.0.1:", "http://[::1]:")):
        raise SystemExit("the prober targets 127.0.0.1 or ::1 only")
    url = urlsplit(args.url)
    assert url.hostname is not None and url.port is not None
    probe = Probe(url.hostname, url.port, url.path or "/")
    latencies: list[float] = []
    failed = 0
    while (now := time.time()) < args.end:
        t0 = time.perf_counter()
        try:
            ok = probe.get() == 200
        except (OSError, ValueError):
            ok = False
            probe.reset()
        ms = (time.perf_counter() - t0) * 1e3 if ok else TIMEOUT_S * 1e3
        if now >= args.start:
            latencies.append(ms)
            failed += not ok
        rest = INTERVAL_S - (time.perf_counter() - t0)
        if rest > 0:
            time.sleep(rest)
    probe.reset()
    result = {
        "probes": len(latencies),
        "failed": failed,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies, default=float("nan")),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
