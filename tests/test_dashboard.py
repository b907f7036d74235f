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
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.async_api import Page, Request, Route, async_playwright, expect

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


async def test_pages_load_nothing_from_other_hosts(embedded_server: Server, page: Page) -> None:
    """/, /docs and /redoc render with every request (scripts, styles, fonts, icons) sent to
    the service itself: they work on a network without internet. (ReDoc's bundle asks for a
    Redocly logo on a CDN; the page's Content-Security-Policy keeps the browser from sending
    that request.)"""
    server = embedded_server
    sent_elsewhere: list[str] = []
    blocked: set[str] = set()

    async def network(route: Route) -> None:
        # Every request the browser actually sends passes here; one to another host fails.
        if urlsplit(route.request.url).hostname != "127.0.0.1":
            sent_elsewhere.append(route.request.url)
            await route.abort()
        else:
            await route.continue_()

    def failed(request: Request) -> None:
        if request.failure == "csp":  # refused by the page's policy, never sent
            blocked.add(request.url)

    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.on("requestfailed", failed)
    await page.route("**/*", network)
    await page.goto(server.url + "/")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    await page.goto(server.url + "/docs")
    await expect(page.locator(".swagger-ui .info .title")).to_contain_text("sensorcast")
    await expect(page.locator(".opblock-summary-path").first).to_be_visible()
    await page.goto(server.url + "/redoc")
    await expect(page.locator("h1").first).to_contain_text("sensorcast")
    await expect(page.get_by_text("Send readings").first).to_be_attached()
    await page.wait_for_load_state("networkidle")
    assert sent_elsewhere == []
    others = {u for u in requested if urlsplit(u).hostname != "127.0.0.1"}
    others -= {u for u in others if u.startswith(("data:", "blob:"))}
    assert others <= blocked, others - blocked
    assert any(url.endswith("/openapi.json") for url in requested)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        icon = await http.get("/favicon.ico")
        assert icon.status_code == 200 and icon.content[:4] == b"\x00\x00\x01\x00"  # ICO
        for path in ("/", "/docs", "/redoc"):
            html = (await http.get(path)).text
            assert "https://" not in html and "http://" not in html, path


async def test_dashboard_asks_for_a_key_and_takes_one(server_factory, page: Page) -> None:
    """Opened without a key where keys are set, the page says a key is needed (not "no
    sensors yet") and offers a field; the key typed there brings the live data."""
    reader = "reader-key-0123456789abcdef"
    server = server_factory(api_keys=f"{reader}:subscribe+ingest")
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(
            f"{server.url}/v1/readings",
            json=readings("locked-1", 0, 3),
            headers={"X-API-Key": reader},
        )
    assert response.status_code == 202
    await page.goto(server.url + "/")
    await expect(page.locator("#keyform")).to_be_visible()
    await expect(page.locator("#key-reason")).to_contain_text("needs an API key")
    await expect(page.locator("#conn")).to_have_text("key needed")
    await expect(page.locator("#empty")).to_be_hidden()
    await page.locator("#key-input").fill(reader)
    await page.locator("#keyform button").click()
    await expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    assert urlsplit(page.url).query == f"key={reader}"
    await expect(page.locator("#keyform")).to_be_hidden()
    await expect(page.locator('#sensors tr[data-sensor="locked-1"] td').nth(2)).to_have_text("3")


async def test_dashboard_shows_why_the_connection_ended(server_factory, page: Page) -> None:
    """When the service closes or refuses the WebSocket, the page shows the reason (the
    close frame's, or what the service answers over HTTP), not a bare close code."""
    server = server_factory()
    await page.goto(server.url + "/")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    await page.evaluate(
        """() => {
            window.connTexts = [];
            new MutationObserver(() => connTexts.push($("conn").textContent))
                .observe($("conn"), {childList: true, characterData: true, subtree: true});
        }"""
    )
    assert await asyncio.to_thread(server.stop) == 0
    await page.wait_for_function(
        "() => connTexts.some((t) => t.includes('does not answer'))", timeout=20_000
    )
    texts = await page.evaluate("() => connTexts")
    assert any("1001" in t and "server shutting down" in t for t in texts), texts


async def test_dashboard_smooths_a_bursty_rate(page: Page, embedded_server: Server) -> None:
    """The readings/s figure is an exponentially weighted mean: a sender alternating 400/s
    and 0/s each second reads about 200/s, never 0 or 400."""
    await page.goto(embedded_server.url + "/")
    shown = await page.evaluate(
        """() => {
            let rate = null; const out = [];
            for (let i = 0; i < 40; i++) {
                rate = smoothRate(rate, i % 2 ? 0 : 400, 1.0);
                out.push(rate);
            }
            return out;
        }"""
    )
    settled = shown[20:]
    assert all(150 < r < 250 for r in settled), settled
    assert max(settled) - min(settled) < 100


async def test_dashboard_lists_active_alarms(embedded_server: Server, page: Page) -> None:
    """A sustained fault's alarm appears in the dashboard's active alarms while it lasts,
    with its sensor, and leaves the list when it clears."""
    from tests.test_alarms import END, START, fault_series

    server = embedded_server
    await page.goto(server.url + "/")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    series = fault_series("dash-alarm")
    for i in range(0, START + 100, 500):
        await send(server, series[i : min(i + 500, START + 100)])
    alarm = page.locator('#alarms li[data-alarm^="dash-alarm@"]')
    await expect(alarm).to_have_count(1, timeout=20_000)
    await expect(alarm).to_contain_text("dash-alarm")
    assert int(await page.locator("#alarm-count").inner_text()) >= 1
    for i in range(START + 100, len(series), 500):
        await send(server, series[i : i + 500])
    await expect(alarm).to_have_count(0, timeout=20_000)
    assert END < len(series)
