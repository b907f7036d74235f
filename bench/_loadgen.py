"""A saturating load generator, run as its own process by ``bench/saturation.py``.

``python -m bench._loadgen URL --connections C --sensors S --start T0 --end T1 --stop T2``
keeps ``C`` connections posting bodies of ``--batch`` readings to ``URL/v1/readings`` until
the epoch time T2. Each connection owns ``S`` sensors of its own and sends their readings in
order with rising ``ts`` (``bench/_workload.py``): a connection sends its next body once the
previous one was accepted. A 503 is honoured as a client should: wait ``Retry-After``, then
send the same body again (so nothing is skipped and each sensor's order holds). Prints one
``RESULT {json}`` line: readings accepted (202) between T0 and T1, requests refused (503)
and failed, and the seconds spent waiting on ``Retry-After``.

It speaks HTTP/1.1 on its own keep-alive connections (asyncio streams, on uvloop) rather than
through an HTTP client library: it shares the machine with the service it loads, and with
httpx each of the two load generators took about 5 % of a core at this load against under
2 % now (``bench/saturation.py`` reports the bench's own CPU beside the service's). What it
sends is an ordinary request; what it reads of the answer is the status,
``Content-Length``, ``Retry-After`` and ``Connection: close``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import urlsplit

from bench._workload import Stream, sensor_ids

TIMEOUT_S = 30.0
"""A connection, or a request's answer, that takes longer has failed."""
IDLE_S = 4.0
"""A connection idle this long (a Retry-After wait) is replaced before it is used again:
the server closes idle keep-alive connections after about 5 s."""


class Answer(Exception):
    """The connection broke, or the answer could not be read."""


async def _post(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, body: bytes
) -> tuple[int, float | None, bool]:
    """Send one POST; return its status, its ``Retry-After`` (seconds, when given in seconds)
    and whether the server closes the connection after it."""
    writer.write(head + str(len(body)).encode() + b"\r\n\r\n" + body)
    try:
        await writer.drain()
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, retry_after, close = 0, None, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name, value = name.strip().lower(), value.strip()
            if name == "content-length":
                length = int(value)
            elif name == "retry-after":
                # Seconds; an HTTP date is taken as the default wait.
                retry_after = float(value) if value.isdigit() else None
            elif name == "connection":
                close = value.lower() == "close"
            elif name == "transfer-encoding":
                raise Answer(f"a {value} answer: not read by this client")
        if length:
            await reader.readexactly(length)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise Answer(str(exc)) from None
    except (IndexError, ValueError):
        raise Answer("not an HTTP answer") from None
    return status, retry_after, close


async def run(args: argparse.Namespace) -> dict[str, float]:
    counts = {"accepted": 0, "accepted_total": 0, "refused": 0, "failed": 0, "waited_s": 0.0}
    url = urlsplit(args.url)
    assert url.hostname is not None and url.port is not None
    head = (
        f"POST /v1/readings HTTP/1.1\r\nHost: {url.netloc}\r\n"
        "Content-Type: application/json\r\nContent-Length: "
    ).encode()

    async def connection(n: int) -> None:
        stream = Stream(sensor_ids(args.sensors, prefix=f"{args.prefix}{n}"))
        body = stream.body(args.batch)
        connected: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        used = 0.0

        def disconnect() -> None:
            nonlocal connected
            if connected is not None:
                connected[1].close()
                connected = None

        while time.time() < args.stop:
            if connected is not None and time.monotonic() - used > IDLE_S:
                disconnect()
            try:
                async with asyncio.timeout(TIMEOUT_S):
                    if connected is None:
                        connected = await asyncio.open_connection(url.hostname, url.port)
                    status, retry_after, close = await _post(*connected, head, body)
            except (OSError, TimeoutError, Answer):
                counts["failed"] += 1
                disconnect()
                await asyncio.sleep(0.1)
                continue  # the same body again
            used = time.monotonic()
            if close:
                disconnect()
            if status == 503:
                counts["refused"] += 1
                wait = min(retry_after if retry_after is not None else 1.0, 5.0)
                counts["waited_s"] += wait
                await asyncio.sleep(wait)
                continue  # the same body again
            if status == 202:
                now = time.time()
                counts["accepted_total"] += args.batch
                if args.start <= now <= args.end:
                    counts["accepted"] += args.batch
            else:
                counts["failed"] += 1
            body = stream.body(args.batch)
        disconnect()

    await asyncio.gather(*(connection(n) for n in range(args.connections)))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=3)
    parser.add_argument("--sensors", type=int, default=100, help="per connection")
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--prefix", default="g")
    parser.add_argument("--start", type=float, required=True)
    parser.add_argument("--end", type=float, required=True)
    parser.add_argument("--stop", type=float, required=True)
    args = parser.parse_args()
    if not args.url.startswith(("http://127.0.0.1:", "http://[::1]:")):
        raise SystemExit("the load generator targets 127.0.0.1 or ::1 only")
    import uvloop

    print("RESULT " + json.dumps(uvloop.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
