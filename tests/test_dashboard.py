"""The live dashboard at GET /, in a real browser (Debian's Chromium driven by Playwright)."""

from __future__ import annotations

import math
import time
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.conftest import ARTIFACTS, Server

pytestmark = pytest.mark.browser

T0 = time.time() - 3600


def readings(sensor: str, start: int, count: int, spike_at: int | None = None) -> list[Any]:
    """A gentle sine per sensor; ``spike_at`` gets a jump no model can expect."""
    out = []
    for i in range(start, start + count):
        value = 20 + 2 * math.sin(i / 4) + (60 if i == spike_at else 0)
        out.append({"sensor_id": sensor, "ts": T0 + i, "value": value, "id": f"{sensor}-{i}"})
    return out


def send(server: Server, batch: list[Any]) -> None:
    response = httpx.post(f"{server.url}/v1/readings", json=batch, timeout=30)
    assert response.status_code == 202, response.text


def warm_up(server: Server, sensors: list[str], upto: int) -> None:
    """Enough readings, in several requests, for each sensor's model to be fitted."""
    for start in range(0, upto, 10):
        send(server, [r for s in sensors for r in readings(s, start, 10)])
        time.sleep(0.15)


def test_dashboard_shows_sensors_chart_and_anomaly(server: Server, page: Page) -> None:
    """The page fills its sensor list and figures, charts the selected sensor, marks a spike."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_viewport_size({"width": 1280, "height": 800})
    page.goto(server.url + "/")
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")

    sensors = ["dash-boiler", "dash-fan", "dash-pump"]
    warm_up(server, sensors, 60)
    rows = page.locator("#sensors tbody tr[data-sensor]")
    expect(rows).to_have_count(3)
    page.locator('#sensors tr[data-sensor="dash-pump"]').click()
    expect(page.locator("#chart-title")).to_have_text("dash-pump")

    send(server, readings("dash-pump", 60, 10, spike_at=64) + readings("dash-fan", 60, 10))
    chart = page.locator("#chart")
    page.wait_for_function(
        "() => +document.getElementById('chart').dataset.anomalies >= 1", timeout=15_000
    )
    assert int(chart.get_attribute("data-points") or 0) >= 20
    pump = page.locator('#sensors tr[data-sensor="dash-pump"] td')
    expect(pump.nth(3)).not_to_have_text("0")
    expect(page.locator("#anomalies li").first).to_contain_text("dash-pump")
    expect(page.locator("#subscribers")).not_to_have_text("–")
    expect(page.locator("#rate")).not_to_have_text("–")
    expect(page.locator("#latency")).to_contain_text("ms")

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    assert not errors, errors


def test_dashboard_resumes_with_since(server: Server, page: Page) -> None:
    """After its WebSocket drops, the page reconnects with since= and misses no reading."""
    urls: list[str] = []
    page.on("websocket", lambda ws: urls.append(ws.url))
    page.goto(server.url + "/#sensor=resume-1")
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    send(server, readings("resume-1", 0, 5))
    row = page.locator('#sensors tr[data-sensor="resume-1"] td')
    expect(row.nth(2)).to_have_text("5")

    page.evaluate("() => state.ws.close()")
    send(server, readings("resume-1", 5, 7))  # while disconnected
    expect(page.locator("#conn")).to_have_attribute("data-state", "live")
    expect(row.nth(2)).to_have_text("12")
    assert len(urls) >= 2
    assert "since=" in urls[-1] and "snapshot" not in urls[-1]
    assert "snapshot=true" in urls[0]
