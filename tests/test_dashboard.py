"""The live dashboard at GET /, in a real browser: Debian's Chromium driven by Playwright.

Playwright's async API is used directly (not pytest-playwright's sync fixtures): the sync
API keeps its own event loop running on the main thread for the whole session, which breaks
every asyncio test that runs after it.
"""

from __future__ import annotations

import asyncio
import csv
import math
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, async_playwright, expect

from tests.conftest import ROOT, Server, connect, quiet, receive_json

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent (apt-get install chromium)"
    ),
]

T0 = time.time() - 3600


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    """A fresh page in Debian's Chromium (never a downloaded browser)."""
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 800})
            yield page
        finally:
            await browser.close()


def readings(sensor: str, start: int, count: int, spike_at: int | None = None) -> list[Any]:
    """A gentle sine per sensor; ``spike_at`` gets a jump no model can expect."""
    out = []
    for i in range(start, start + count):
        value = 20 + 2 * math.sin(i / 4) + (60 if i == spike_at else 0)
        out.append({"sensor_id": sensor, "ts": T0 + i, "value": value, "id": f"{sensor}-{i}"})
    return out


async def send(server: Server, batch: list[Any]) -> None:
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(f"{server.url}/v1/readings", json=batch)
    assert response.status_code == 202, response.text


async def warm_up(server: Server, page: Page, sensors: list[str], upto: int) -> None:
    """Enough readings, in several requests, for each sensor's model to be fitted."""
    for start in range(0, upto, 10):
        await send(server, [r for s in sensors for r in readings(s, start, 10)])
        await page.wait_for_timeout(150)


async def test_dashboard_shows_sensors_chart_and_anomaly(
    embedded_server: Server, page: Page
) -> None:
    """The page fills its sensor list and figures, charts the selected sensor, marks a spike."""
    server = embedded_server
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(server.url + "/")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "live")

    sensors = ["dash-boiler", "dash-fan", "dash-pump"]
    await warm_up(server, page, sensors, 60)
    await expect(page.locator("#sensors tbody tr[data-sensor]")).to_have_count(3)
    await page.locator('#sensors tr[data-sensor="dash-pump"]').click()
    await expect(page.locator("#chart-title")).to_have_text("dash-pump")

    await send(server, readings("dash-pump", 60, 10, spike_at=64) + readings("dash-fan", 60, 10))
    await page.wait_for_function(
        "() => +document.getElementById('chart').dataset.anomalies >= 1", timeout=15_000
    )
    assert int(await page.locator("#chart").get_attribute("data-points") or 0) >= 20
    pump = page.locator('#sensors tr[data-sensor="dash-pump"] td')
    await expect(pump.nth(3)).to_have_text("1")
    await expect(page.locator('#sensors tr[data-sensor="dash-fan"] td').nth(3)).to_have_text("0")
    await expect(page.locator("#anomalies li").first).to_contain_text("dash-pump")
    await expect(page.locator("#subscribers")).not_to_have_text("–")
    await expect(page.locator("#rate")).not_to_have_text("–")
    await expect(page.locator("#latency")).to_contain_text("ms")

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert not errors, errors


async def test_dashboard_resumes_with_since(embedded_server: Server, page: Page) -> None:
    """After its WebSocket drops, the page reconnects with since= and misses no reading."""
    server = embedded_server
    urls: list[str] = []
    page.on("websocket", lambda ws: urls.append(ws.url))
    await page.goto(server.url + "/#sensor=resume-1")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    await send(server, readings("resume-1", 0, 5))
    row = page.locator('#sensors tr[data-sensor="resume-1"] td')
    await expect(row.nth(2)).to_have_text("5")

    await page.evaluate("() => state.ws.close()")
    await send(server, readings("resume-1", 5, 7))  # while disconnected
    await expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    await expect(row.nth(2)).to_have_text("12")
    assert len(urls) >= 2
    assert "since=" in urls[-1] and "snapshot" not in urls[-1]
    assert "snapshot=true" in urls[0]


async def test_dashboard_with_api_keys(server_factory, page: Page) -> None:
    """Where keys are set, the page opened as /?key=... shows the live data with that key."""
    reader, writer = "reader-key-0123456789abcdef", "writer-key-0123456789abcdef"
    server = server_factory(api_keys=f"{reader}:subscribe,{writer}:ingest")
    await page.goto(f"{server.url}/?key={reader}")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(
            f"{server.url}/v1/readings",
            json=readings("keyed-1", 0, 3),
            headers={"X-API-Key": writer},
        )
    assert response.status_code == 202
    await expect(page.locator('#sensors tr[data-sensor="keyed-1"] td').nth(2)).to_have_text("3")
    await expect(page.locator("#subscribers")).to_have_text("1")


async def test_dashboard_while_the_simulator_runs(
    embedded_server: Server, page: Page, tmp_path: Path
) -> None:
    """Run `sensorcast simulate`: the list fills, the chart draws, injected anomalies are marked."""
    server = embedded_server
    await page.goto(server.url + "/")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    labelled_csv = tmp_path / "labelled.csv"
    async with connect(f"{server.ws_url}?sensor=dsim-*&anomalies_only=true") as flagged_ws:
        await receive_json(flagged_ws)
        sim = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "app", "simulate", "--url", server.url, "--sensors", "3",
            "--rate", "150", "--duration", "6", "--anomaly-rate", "0.03", "--seed", "11",
            "--csv", str(labelled_csv), "--prefix", "dsim",
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(sim.communicate(), 60)
        assert sim.returncode == 0, out.decode()
        flagged = await quiet(flagged_ws, 2.0)
    with labelled_csv.open() as f:
        labelled = {(row["sensor_id"], row["id"]) for row in csv.DictReader(f) if row["anomaly"]}
    assert labelled, "the simulator injected no anomaly"
    # The service flagged readings the simulator labelled as injected anomalies.
    assert {(m["sensor_id"], m["id"]) for m in flagged} & labelled

    # The module's server is shared: count only this test's sensors.
    await expect(page.locator('#sensors tbody tr[data-sensor^="dsim-"]')).to_have_count(3)
    await page.locator('#sensors tr[data-sensor="dsim-0"]').click()
    await expect(page.locator("#chart-title")).to_have_text("dsim-0")
    # Selected afterwards, the chart starts from the sensor's recent predictions (20).
    await page.wait_for_function(
        "() => +document.getElementById('chart').dataset.points >= 20", timeout=10_000
    )
    await page.wait_for_function(
        "() => document.querySelectorAll('#anomalies li').length >= 1", timeout=10_000
    )
    marked = {
        await li.get_attribute("data-sensor") for li in await page.locator("#anomalies li").all()
    }
    assert marked & {sensor for sensor, _ in labelled}
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard-simulate.png"), full_page=True)
