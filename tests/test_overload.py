"""Overload for a bounded time: every stage stays bounded and nothing accepted is lost."""

from __future__ import annotations

import asyncio
import re

import httpx
import psutil
import pytest

from tests.conftest import Server, connect, receive_json
from tests.test_recovery import Load, Receiver, check_exactly_once_in_order


@pytest.mark.parametrize("wait_ms", ["0", "1000"], ids=["refused-at-once", "waiting"])
async def test_overload_with_a_subscriber_loses_nothing_and_stays_bounded(
    server_factory, wait_ms: str
) -> None:
    """Four senders flood small queues for a few seconds: requests wait for room or get 503,
    every accepted reading is predicted exactly once, in order, and memory stays bounded."""
    srv: Server = server_factory(
        queue_max_readings="4000",
        admission_wait_ms=wait_ms,
        publish_max_pending_messages="2000",
        batch_max_size="500",
        subscriber_queue_frames="100000",  # this test's subscriber shares a core with 4 senders
    )
    process = psutil.Process(srv.proc.pid)
    async with (
        httpx.AsyncClient(base_url=srv.url, timeout=30) as client,
        connect(f"{srv.ws_url}?batch=true") as ws,
    ):
        await receive_json(ws)
        idle_rss = process.memory_info().rss
        receiver = Receiver(ws)
        loads = [Load(client, sensors=10, batch=500, prefix=f"o{n}-") for n in range(4)]
        listening = asyncio.create_task(receiver.run())
        senders = [asyncio.create_task(load.run(pause_s=0.0)) for load in loads]
        peak = idle_rss
        for _ in range(40):
            await asyncio.sleep(0.1)
            peak = max(peak, process.memory_info().rss)
        for load in loads:
            load.stop()
        await asyncio.gather(*senders)
        accepted = sum(len(load.accepted) for load in loads)
        await receiver.wait_for(accepted, timeout_s=120)
        listening.cancel()
        metrics = (await client.get("/metrics")).text
    refused = sum(load.statuses[503] for load in loads)
    waits = re.search(r"^sensorcast_admission_waits_total (\S+)$", metrics, re.M)
    assert waits is not None
    print(
        f"\n{accepted} accepted, {refused} refused, {float(waits[1]):.0f} waits for room, "
        f"RSS +{(peak - idle_rss) >> 20} MiB"
    )
    if wait_ms == "0":
        assert refused > 0, "the senders did not overload the service"
    else:
        assert float(waits[1]) > 0, "the senders did not overload the service"
    assert receiver.lagged == 0
    for load in loads:
        mine = [p for p in receiver.predictions if p["sensor_id"].startswith(load.prefix)]
        check_exactly_once_in_order(load.accepted, mine)
    assert peak - idle_rss < 300 << 20, "memory grew under overload"
