"""``sensorcast subscribe --pretty``: readable lines for people, against a real server."""

from __future__ import annotations

import asyncio
import sys

import httpx

from tests.conftest import ROOT, Server, post


async def test_pretty_lines(embedded_server: Server) -> None:
    server = embedded_server
    """--pretty prints one readable line per message, not JSON, with the sensor and values."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "subscribe", "--url", server.ws_url,
        "--sensor", "pretty-*", "--pretty", "--count", "3",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    hello = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert hello.decode().startswith("connected: epoch ")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        readings = [{"sensor_id": "pretty-1", "value": 1.5 + i, "id": f"p{i}"} for i in range(3)]
        assert (await post(http, readings)).status_code == 202
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert not line.startswith("{")
        assert "pretty-1" in line and f"value={1.5 + i:.4g}" in line and "warming up" in line
