"""The console in a real headless Chromium (Debian's) driven by Playwright, against a real agent.

A ``plantgate run`` child reads a real OPC UA press and the MES webhook and
publishes to a real mosquitto, where a subscriber records what arrives. The page
follows the press going down and coming back without a reload; a dead letter made
by an obsolete item code is replayed from the page after a mapping reload (SIGHUP)
and reaches the subscriber under its original id; a replay without the token is
refused and the page says so; purge asks for a confirmation. A screenshot of each
page is written to ``bench/results/console/`` for the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.simulator import PressSimulator
from tests.peers.mosquitto import MosquittoBroker, MqttCollector, free_port
from tests.peers.waiting import wait_for

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)
try:
    from playwright.async_api import Browser, Page, async_playwright, expect
except ImportError:  # pragma: no cover - a dev dependency
    pytest.skip("playwright (Python) is not installed", allow_module_level=True)

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "bench" / "results" / "console"
TOKEN = "console-ingest-token"
PREFIX = "plantgate/plant-console"
CONSUMED = f"{PREFIX}/transaction/material.consumed"
OBSOLETE = '"P-100-OLD" = { obsolete = true }'
MAPPED = '"P-100-OLD" = "40012345000099"'

CONFIG = """\
[agent]
site = "plant-console"
id = "gw-console"
data_dir = "{data_dir}"

[http]
listen = "127.0.0.1:{port}"
ingest_token_file = "ingest-token"

[[sources.opcua]]
name = "press7"
endpoint = "{endpoint}"
publishing_interval = "50ms"
reconnect_max_backoff = "1s"

  [[sources.opcua.tags]]
  tag = "press7.temperature"
  node = "ns=2;s=Press7.Temperature"
  kind = "telemetry"

  [[sources.opcua.tags]]
  tag = "press7.oil_pressure"
  node = "ns=2;s=Press7.OilPressure"
  kind = "telemetry"

  [[sources.opcua.tags]]
  tag = "press7.cycle_done"
  node = "ns=2;s=Press7.CycleDone"
  kind = "value"

  [[sources.opcua.tags]]
  tag = "press7.cycle_ack"
  node = "ns=2;s=Press7.CycleAck"
  kind = "value"

  [[sources.opcua.tags]]
  tag = "press7.work_order"
  node = "ns=2;s=Press7.WorkOrder"
  kind = "value"

  [[sources.opcua.tags]]
  tag = "press7.item"
  node = "ns=2;s=Press7.Item"
  kind = "value"

  [[sources.opcua.tags]]
  tag = "press7.batch_qty"
  node = "ns=2;s=Press7.BatchQty"
  kind = "value"

[[sources.mes]]
name = "mes"
mode = "webhook"

[[transactions]]
name = "press7-completion"
when = "press7.cycle_done"
type = "production.completed"
fields = {{ work_order = "press7.work_order", item = "press7.item", quantity = "press7.batch_qty" }}
uom = "EA"
ack = "press7.cycle_ack"

[mappings]
unknown_items = "pass"

[mappings.items]
{item}

[[sinks.mqtt]]
name = "cloud"
url = "{mqtt_url}"
topic_prefix = "{prefix}"
reconnect_max_backoff = "1s"
"""


class RunningAgent:
    """A ``plantgate run`` child: its config, its address and an HTTP client."""

    def __init__(self, directory: Path, port: int, press: PressSimulator, broker: MosquittoBroker):
        self.directory = directory
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.press = press
        self.broker = broker
        self.config = directory / "plantgate.toml"
        self.process: asyncio.subprocess.Process | None = None
        self.client = httpx.AsyncClient(base_url=self.url, timeout=10)

    def write_config(self, item: str) -> None:
        self.config.write_text(
            CONFIG.format(
                data_dir=self.directory / "data",
                port=self.port,
                endpoint=self.press.endpoint,
                mqtt_url=self.broker.url,
                prefix=PREFIX,
                item=item,
            ),
            encoding="utf-8",
        )

    async def status(self) -> dict[str, Any]:
        response = await self.client.get("/status")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def post_event(self, event_id: str, item: str) -> None:
        body = {
            "specversion": "1.0",
            "id": event_id,
            "source": "mes://plant/erp-bridge",
            "type": "io.plantgate.material.consumed",
            "time": "2026-12-04T08:00:00Z",
            "subject": "WO-4711",
            "data": {"work_order": "WO-4711", "item": item, "quantity": {"value": "2.5", "uom": "EA"}},
        }
        headers = {"Content-Type": "application/cloudevents+json", "Authorization": f"Bearer {TOKEN}"}
        response = await self.client.post("/v1/events", content=json.dumps(body).encode(), headers=headers)
        assert response.status_code == 202, response.text

    def log(self) -> str:
        return (self.directory / "agent.log").read_text(encoding="utf-8", errors="replace")

    async def start(self) -> None:
        """Start ``plantgate run``; returns once it answers and reads the press."""
        with (self.directory / "agent.log").open("ab") as log:
            self.process = process = await asyncio.create_subprocess_exec(
                str(Path(sys.executable).parent / "plantgate"),
                "run",
                "-c",
                str(self.config),
                "--log-format",
                "json",
                stdout=log,
                stderr=log,
            )

        async def connected() -> bool:
            assert process.returncode is None, self.log()
            with contextlib.suppress(httpx.TransportError):
                status = await self.status()
                return bool(status["sources"]["press7"]["state"] == "connected")
            return False

        await wait_for(connected, timeout=30, interval=0.1, message="the agent runs and reads the press")

    async def stop(self) -> None:
        """SIGTERM, and wait for the agent to drain and exit."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()


@contextlib.asynccontextmanager
async def running_agent(tmp_path: Path, press: PressSimulator, broker: MosquittoBroker) -> AsyncIterator[RunningAgent]:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "ingest-token").write_text(TOKEN + "\n", encoding="utf-8")
    agent = RunningAgent(tmp_path, free_port(), press, broker)
    agent.write_config(OBSOLETE)
    try:
        await agent.start()
        yield agent
    finally:
        await agent.client.aclose()
        await agent.stop()


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


def expected(text: str) -> bool:
    """A failed fetch the page handles: refused (401), not known (404, 503), or the agent away."""
    return text.startswith("Failed to load resource") and (
        re.search(r"status of (401|404|503)", text) is not None or "ERR_CONNECTION_REFUSED" in text
    )


async def open_console(browser: Browser, agent: RunningAgent, tab: str = "overview") -> tuple[Page, list[str]]:
    """A page on the console's ``tab``, shown live; and the errors its script raises or the browser
    reports (a CSP violation among them), as they come."""
    page = await browser.new_page(viewport={"width": 1280, "height": 800})
    page.set_default_timeout(15_000)
    problems: list[str] = []
    # The browser logs every failed fetch; those the page handles are not script errors.
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" and not expected(m.text) else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    await page.goto(f"{agent.url}/#{tab}")
    await expect(page.locator("#live")).to_have_attribute("data-state", "live")
    return page, problems


async def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


async def test_the_pages_follow_the_plant_live_without_a_reload(
    tmp_path: Path, press_server: PressSimulator, mosquitto: MosquittoBroker
) -> None:
    async with running_agent(tmp_path, press_server, mosquitto) as agent, chromium() as browser:
        assert await press_server.complete_cycle("WO-1001", "FILL-500", 12, wait_ack=10)
        page, problems = await open_console(browser, agent)
        await page.evaluate("window.sameDocument = true")  # gone if the page were reloaded
        state = page.locator('#sources tr[data-source="press7"] td.state')
        await expect(state).to_have_text("connected")
        await expect(page.locator('#sources tr[data-source="press7"] td.last-value')).to_contain_text("ago")
        await expect(page.locator('#sinks tr[data-sink="cloud"] td.state')).to_have_text("connected")
        await expect(page.locator("#agent-facts")).to_contain_text("gw-console at plant-console")
        await expect(page.locator("#agent-facts")).to_contain_text(str(agent.config))  # the file it runs from
        # A node the press does not have is named with its node id and the server's status code.
        await expect(page.locator('#sources tr[data-source="press7"] td.degraded')).to_contain_text(
            re.compile(r"ns=2;s=Press7\.OilPressure.*Bad")
        )
        await screenshot(page, "overview")

        # The press goes away: the page shows it without a reload, and shows it back.
        await press_server.stop()
        await expect(state).to_have_text(re.compile(r"^(reconnecting|disconnected)$"))
        await expect(page.locator('#sources tr[data-source="press7"] td.error')).not_to_have_count(0)
        await press_server.start()
        await expect(state).to_have_text("connected", timeout=20_000)
        assert await page.evaluate("window.sameDocument") is True
        assert await press_server.complete_cycle("WO-1002", "FILL-500", 14, wait_ack=10)

        # Tags: the values the press last sent, and the rule they feed with its last transaction.
        await page.click("#tab-tags")
        await expect(page.locator('#tags tr[data-tag="press7.work_order"] td.value')).to_have_text("WO-1002")
        await expect(page.locator('#rules tr[data-rule="press7-completion"]')).to_contain_text("WO-1002")
        await page.fill("#tag-filter", "batch")
        await expect(page.locator("#tags tbody tr")).to_have_count(1)
        await page.fill("#tag-filter", "")
        await expect(page.locator("#tags tbody tr")).to_have_count(7)
        await screenshot(page, "tags")

        # Events: the transaction listed, its whole CloudEvent on click, found by its work order.
        await page.click("#tab-events")
        row = page.locator('table[data-lane="transaction"] tbody tr').filter(has_text="WO-1002")
        await expect(row).to_have_count(1)
        await row.click()
        await expect(page.locator("#event-json")).to_contain_text('"specversion": "1.0"')
        await expect(page.locator("#event-json")).to_contain_text('"work_order": "WO-1002"')
        await page.fill("#search-key", "WO-1002")
        await page.press("#search-key", "Enter")
        await expect(page.locator("#search-events tbody tr")).to_have_count(1)
        # The journey when the agent keeps one, else a clear word that it is not available; a journal
        # that wants the token gets it through the token dialog, never in the address.
        journey = page.locator("#journey")
        await expect(journey).to_contain_text(re.compile(r"WO-1002|journey not available"))
        if await page.locator("#journey-token").count():
            await page.click("#journey-token")
            await page.fill("#token-input", TOKEN)
            await page.click("#token-ok")
            await expect(journey).not_to_contain_text("needs the agent's token")
            await expect(journey).to_contain_text(re.compile(r"committed|journey not available"))
        await screenshot(page, "events")

        # The agent itself goes away: the page keeps what it showed, marked stale, and picks up
        # again once the agent is back on the same address.
        await page.click("#tab-overview")
        await agent.stop()
        await expect(page.locator("#live")).to_have_attribute("data-state", "stale")
        await expect(page.locator("#live")).to_contain_text("retrying")
        await expect(state).to_have_text("connected")
        await agent.start()
        await expect(page.locator("#live")).to_have_attribute("data-state", "live", timeout=20_000)
        assert await page.evaluate("window.sameDocument") is True
        assert problems == []


async def test_dead_letters_are_replayed_and_purged_from_the_page_with_the_token(
    tmp_path: Path, press_server: PressSimulator, mosquitto: MosquittoBroker
) -> None:
    collector = MqttCollector(mosquitto.host, mosquitto.port, CONSUMED).start()
    try:
        async with running_agent(tmp_path, press_server, mosquitto) as agent, chromium() as browser:
            await agent.post_event("mes-old-1", "P-100-OLD")
            await agent.post_event("mes-old-2", "P-100-OLD")
            page, problems = await open_console(browser, agent, "dead")
            rows = page.locator("#dead tbody tr")
            await expect(rows).to_have_count(2)
            first = page.locator('#dead tbody tr[data-id="mes-old-1"]')
            await expect(first.locator("td.reason")).to_contain_text("obsolete")
            await first.locator("td.reason").click()
            await expect(page.locator("#dead-json")).to_contain_text('"item": "P-100-OLD"')
            await screenshot(page, "dead-letters")

            # Fix the cause: the item is mapped now, and the agent reloads its mappings.
            agent.write_config(MAPPED)
            assert agent.process is not None
            os.kill(agent.process.pid, signal.SIGHUP)

            async def replayable() -> bool:
                found = (await agent.status())["buffer"]["replayable_dead_letters"]
                return bool(found and found["count"] == 2)

            await wait_for(replayable, timeout=15, message="the reload makes both replayable")
            await expect(page.locator("#dead-replayable")).to_contain_text("2 dead letter(s)")

            # Without the token the replay is refused, and the page says so.
            await first.locator("input[type=checkbox]").check()
            await page.click("#replay-selected")
            dialog = page.locator("#token-dialog")
            await expect(dialog).to_be_visible()
            await expect(page.locator("#dead-result")).to_contain_text("Refused")
            await page.click("#token-cancel")
            await expect(dialog).to_be_hidden()
            await expect(page.locator("#dead-result")).to_contain_text("Refused")
            assert (await agent.status())["buffer"]["dead_letters"] == 2

            # With it, the dead letter is delivered under its original id (replayed from its detail).
            await page.click("#replay-one")
            await expect(dialog).to_be_visible()
            await page.fill("#token-input", TOKEN)
            await page.click("#token-ok")
            await expect(page.locator("#dead-result")).to_contain_text("Replayed 1; 0 failed again")
            message = await collector.wait_for_message(lambda m: json.loads(m.payload)["id"] == "mes-old-1", 15)
            delivered = json.loads(message.payload)
            assert delivered["data"]["item"] == "40012345000099"
            await expect(rows).to_have_count(1)
            assert await page.input_value("#token-input") == "", "the token is never shown back"
            assert TOKEN not in await page.content()

            # Purge asks first: cancelled, nothing is removed; confirmed, the dead letter is gone.
            await page.click("#purge-dead")
            await expect(page.locator("#confirm-dialog")).to_be_visible()
            await page.click("#confirm-cancel")
            await expect(page.locator("#dead-result")).to_contain_text("nothing was removed")
            assert (await agent.status())["buffer"]["dead_letters"] == 1
            await page.click("#purge-dead")
            await page.click("#confirm-ok")
            await expect(page.locator("#dead-result")).to_contain_text("Purged 1 dead letter")
            await expect(rows).to_have_count(0)
            assert (await agent.status())["buffer"]["dead_letters"] == 0
            assert "mes-old-2" not in {json.loads(m.payload)["id"] for m in collector.snapshot()}
            assert problems == []
    finally:
        collector.stop()
