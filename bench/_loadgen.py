"""A saturating load generator, run as its own process by ``bench/saturation.py``.

``python -m bench._loadgen URL --connections C --sensors S --start T0 --end T1 --stop T2``
keeps ``C`` connections posting bodies of ``--batch`` readings to ``URL/v1/readings`` until
the epoch time T2. Each connection owns ``S`` sensors of its own and sends their readings in
order with rising ``ts`` (``bench/_workload.py``): a connection sends its next body once the
previous one was accepted. A 503 is honoured as a client should: wait ``Retry-After``, then
send the same body again (so nothing is skipped and each sensor's order holds). Prints one
``RESULT {json}`` line: readings accepted (202) between T0 and T1, requests refused (503)
and failed, and the seconds spent waiting on ``Retry-After``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import httpx

from bench._workload import Stream, sensor_ids


async def run(args: argparse.Namespace) -> dict[str, float]:
    counts = {"accepted": 0, "accepted_total": 0, "refused": 0, "failed": 0, "waited_s": 0.0}
    limits = httpx.Limits(max_connections=args.connections)
    headers = {"content-type": "application/json"}
    url = args.url + "/v1/readings"

    async def connection(client: httpx.AsyncClient, n: int) -> None:
        stream = Stream(sensor_ids(args.sensors, prefix=f"{args.prefix}{n}"))
        body = stream.body(args.batch)
        while time.time() < args.stop:
            try:
                r = await client.post(url, content=body, headers=headers)
            except httpx.HTTPError:
                counts["failed"] += 1
                await asyncio.sleep(0.1)
                continue
            if r.status_code == 503:
                counts["refused"] += 1
                wait = min(float(r.headers.get("retry-after", "1")), 5.0)
                counts["waited_s"] += wait
                await asyncio.sleep(wait)
                continue  # the same body again
            if r.status_code == 202:
                now = time.time()
                counts["accepted_total"] += args.batch
                if args.start <= now <= args.end:
                    counts["accepted"] += args.batch
            else:
                counts["failed"] += 1
            body = stream.body(args.batch)

    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        await asyncio.gather(*(connection(client, n) for n in range(args.connections)))
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
