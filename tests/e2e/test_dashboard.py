"""The live dashboard in a real browser: Debian's headless Chromium driven by Selenium, against
the real market server on 127.0.0.1 (docs/dashboard.md).

The browser is blocking I/O, so each browser step runs in a thread while the server's event
loop goes on serving. The screenshot goes to the test's tmp dir, or to docs/img/ when
MICROTE_DOC_IMAGES=1 (how the README's picture is made).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import socketio
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from ledger.digest import read_rows
from market.core.engine import MarketConfig
from market.core.registry import Registry
from tests.e2e.conftest import TOKENS, client, running

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"

T = 1_699_963_200  # 2023-11-14 12:00 UTC
D = 900
CONFIG = MarketConfig(duration=D, close_steps=2, round_timeout=1.0)
OBSERVERS = {"OP": ("operator", "tok-op"), "DSO": ("dso", "tok-dso")}


def registry() -> Registry:
    roles = {p: ("prosumer", t) for p, t in TOKENS.items() if t and p not in ("CTL", "DSO")}
    entries = {**roles, "CTL": ("controller", TOKENS["CTL"]), **OBSERVERS}
    return Registry.from_dict({"participants": [{"id": p, "role": r, "token": t} for p, (r, t) in entries.items()]})


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("Chromium and ChromeDriver are needed (apt-get install chromium chromium-driver; .ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,1400",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


async def until(driver: WebDriver, what: str, check: Callable[[WebDriver], Any], timeout: float = 10) -> Any:
    """Wait in a thread (the server keeps serving) until `check` is truthy; fail naming `what`."""
    try:
        return await asyncio.to_thread(WebDriverWait(driver, timeout, poll_frequency=0.1).until, check)
    except TimeoutException:
        shown = await asyncio.to_thread(lambda: driver.find_element(By.TAG_NAME, "body").text[:600])
        pytest.fail(f"the dashboard did not show {what} within {timeout} s; it shows:\n{shown}")


def cell_texts(driver: WebDriver, table: str) -> list[list[str]]:
    """The table's cells, read in one script call: the page replaces the rows on every
    snapshot, so elements found one by one can go stale in between."""
    script = "return [...document.querySelectorAll(arguments[0])].map(tr => [...tr.cells].map(td => td.textContent))"
    rows: list[list[str]] = driver.execute_script(script, f"#{table} tbody tr")
    return rows


def js_number(x: float) -> str:
    """How the page's `String(x)` writes a number (the shortest repr, as Python's)."""
    return repr(x).removesuffix(".0")


async def log_in(driver: WebDriver, url: str, pid: str, token: str) -> None:
    def fill() -> None:
        driver.get(f"{url}/dashboard")
        driver.find_element(By.ID, "login-id").send_keys(pid)
        driver.find_element(By.ID, "login-token").send_keys(token)
        driver.find_element(By.ID, "login-button").click()

    await asyncio.to_thread(fill)


async def step(ctl: socketio.AsyncClient, t: int) -> dict[str, Any]:
    reply = await ctl.call("step", {"time": t}, namespace="/simulation", timeout=10)
    assert reply["ok"], reply
    return dict(reply["round"])


def meters_every_round(sio: socketio.AsyncClient, reading: dict[str, Any]) -> None:
    async def on_start_round(msg: dict[str, Any]) -> None:
        await sio.call("meter", {"time_interval": msg["current_round"], **reading}, namespace="/market")

    sio.on("start_round", on_start_round, namespace="/market")


async def test_dashboard_follows_the_market_in_a_browser(ledger_url: str, browser: WebDriver, tmp_path: Path) -> None:
    async with running(CONFIG, ledger_url, registry()) as (url, server):
        ctl = await client(url, "CTL", "/simulation")
        p1, p2 = await client(url, "P1"), await client(url, "P2")
        grid = await client(url, "DSO", "/grid", token="tok-dso")
        meters_every_round(p1, {"generation": {"solar": 600}, "consumption": {"other": {"solar": 100}}})
        meters_every_round(p2, {"consumption": {"other": {"external": 500}}})

        await log_in(browser, url, "OP", "tok-op")
        await until(browser, "the live status", lambda d: d.find_element(By.ID, "status").text == "live")
        assert await asyncio.to_thread(lambda: browser.find_element(By.ID, "mode").text) == "sim"
        assert await asyncio.to_thread(lambda: browser.find_element(By.ID, "registered").text) == "3"

        # The round number advances as the controller steps the market.
        for t in (T, T + D):
            await step(ctl, t)
            await until(
                browser,
                f"round {t}",
                lambda d, t=t: d.find_element(By.ID, "round-time").get_attribute("data-time") == str(t),
            )
        assert await asyncio.to_thread(lambda: browser.find_element(By.ID, "round-time").text) == "2023-11-14 12:15 UTC"

        # An ask and a bid for the slot that clears next; the fill shows the ledger's price.
        slot = [T + 3 * D, T + 4 * D]
        ask = {"quantity": 500, "price": 0.10, "time_delivery": slot, "source": "solar"}
        bid = {"quantity": 400, "price": 0.21, "time_delivery": slot}
        assert (await p1.call("ask", ask, namespace="/market"))["ok"]
        assert (await p2.call("bid", bid, namespace="/market"))["ok"]
        book = await until(browser, "the book of the open slot", lambda d: cell_texts(d, "book") or None)
        assert [row[2:5] + row[5:8] for row in book if row[0] == "2023-11-14 12:45 UTC"] == [
            ["1", "400", "0.21", "0.1", "500", "1"]
        ]
        await step(ctl, T + 2 * D)  # [12:45, 13:00] is last_settle: it clears
        fills = await until(browser, "a fill", lambda d: cell_texts(d, "fills") or None)
        (settlement,) = read_rows(ledger_url, "settlements")
        assert fills == [
            [
                settlement["commit_id"],
                "2023-11-14 12:45 UTC",
                "P1",
                "P2",
                "400",
                js_number(settlement["price_buy"]),
                js_number(settlement["price_sell"]),
            ]
        ]
        assert float(await asyncio.to_thread(lambda: browser.find_element(By.ID, "last-price").text)) == pytest.approx(
            settlement["price_buy"]
        )

        # A grid-state change by the DSO appears for its slot.
        red = T + 4 * D  # next_settle after the step to T + 2D
        reply = await grid.call(
            "grid_state.set", {"time_delivery": [red, red + D], "state": "RED"}, namespace="/grid", timeout=5
        )
        assert reply["ok"], reply
        await step(ctl, T + 3 * D)
        await until(
            browser,
            "the RED slot",
            lambda d: ["2023-11-14 13:00 UTC", "RED"] in cell_texts(d, "grid-states"),
        )
        await until(
            browser,
            "the slots processed",
            lambda d: int(d.find_element(By.ID, "rounds-processed").text) == server.rounds_processed,
        )
        out = DOCS_IMG if os.environ.get("MICROTE_DOC_IMAGES") == "1" else tmp_path
        await asyncio.to_thread(browser.save_screenshot, str(out / "dashboard.png"))
        assert (out / "dashboard.png").stat().st_size > 10_000
        for c in (ctl, p1, p2, grid):
            await c.disconnect()


async def test_dashboard_refuses_a_prosumer_and_a_wrong_token(ledger_url: str, browser: WebDriver) -> None:
    async with running(CONFIG, ledger_url, registry()) as (url, server):
        await log_in(browser, url, "P1", TOKENS["P1"])  # right token, but a prosumer may not watch
        error = await until(browser, "a refusal", lambda d: d.find_element(By.ID, "login-error").text or None)
        assert error == "unauthorized: role prosumer may not use /observe"
        assert not await asyncio.to_thread(lambda: browser.find_element(By.ID, "board").is_displayed())
        assert not server.dashboard.namespace.sessions.sid_of
        await log_in(browser, url, "OP", "wrong-token")
        error = await until(browser, "a refusal", lambda d: d.find_element(By.ID, "login-error").text or None)
        assert error.startswith("unauthorized: unknown id or wrong token")
        assert server.dashboard.sent == 0


async def test_run_report_opens_offline_in_a_browser(browser: WebDriver, tmp_path: Path) -> None:
    """`microte report` of a real run, opened from the file system: every figure decodes and the
    headline numbers are those of the run's summary."""
    from controller.run_report.command import report
    from controller.sim import run_sim

    scenario = Path(__file__).resolve().parents[2] / "scenarios" / "community.toml"
    result = await run_sim(
        scenario, ledger=f"sqlite:///{tmp_path}/run.db", participants=10, days=0.5, progress=False, transport="inproc"
    )
    page = report(f"sqlite:///{tmp_path}/run.db", tmp_path / "report")

    def look() -> tuple[list[tuple[str, int]], dict[str, str], list[str]]:
        browser.get(page.as_uri())
        images = browser.execute_script(
            "return [...document.images].map(i => [i.getAttribute('src').slice(0, 22), i.naturalWidth])"
        )
        kpis = browser.execute_script(
            "return Object.fromEntries([...document.querySelectorAll('[data-kpi]')]"
            ".map(r => [r.dataset.kpi, r.dataset.value]))"
        )
        links = browser.execute_script(
            "return [...document.querySelectorAll('[src],[href]')]"
            ".map(e => e.getAttribute('src') || e.getAttribute('href'))"
        )
        return images, kpis, links

    images, kpis, links = await asyncio.to_thread(look)
    assert len(images) >= 5 and all(src == "data:image/png;base64," and width > 300 for src, width in images), images
    assert int(kpis["trades"]) == result.summary.trades > 0
    assert float(kpis["self_sufficiency"]) == result.summary.self_sufficiency
    assert all(link.startswith(("data:", "#")) for link in links), links  # nothing fetched from anywhere
    out = DOCS_IMG if os.environ.get("MICROTE_DOC_IMAGES") == "1" else tmp_path
    await asyncio.to_thread(browser.save_screenshot, str(out / "report-page.png"))
    assert (out / "report-page.png").stat().st_size > 10_000
