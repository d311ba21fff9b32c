"""End to end: an MES retry after the agent restarted, its original long delivered, is stored once.

A real agent (MES webhook in, a real mosquitto out) takes an event, delivers it
and deletes it from the buffer; then it is stopped and started again on the same
data directory, and the MES posts the same event again (it never saw the 202, say).
The agent answers 202 again, and the cloud gets the fact once: the id is in the
buffer file's dedupe window.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import httpx

from agent.pipeline import Agent
from agent.settings import Settings, parse_settings
from tests.peers.mosquitto import MosquittoBroker, MqttCollector
from tests.peers.waiting import wait_for

TOKEN = "dedupe-ingest-token"
PREFIX = "plantgate/plant-dedupe"

CONFIG = """
[agent]
site = "plant-dedupe"
id = "gw-dedupe"
data_dir = "{data_dir}"

[buffer]
dedupe_window = "2h"

[http]
listen = "127.0.0.1:0"
ingest_token_file = "ingest-token"

[[sources.mes]]
name = "mes"
mode = "webhook"

[[sinks.mqtt]]
name = "cloud"
url = "{mqtt_url}"
topic_prefix = "{prefix}"
"""


def consumed(n: int) -> dict[str, object]:
    return {
        "specversion": "1.0",
        "id": f"mes-consumed-{n}",
        "source": "mes://plant/mes",
        "type": "io.plantgate.material.consumed",
        "time": "2026-12-04T10:00:00Z",
        "subject": f"WO-{n}",
        "data": {"work_order": f"WO-{n}", "item": "RAW-7", "quantity": {"value": f"{n}.5", "uom": "KGM"}},
    }


async def post_and_deliver(agent: Agent, body: list[dict[str, object]]) -> None:
    assert agent.http is not None
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/cloudevents-batch+json"}
    async with httpx.AsyncClient(base_url=agent.http.url, headers=headers, timeout=10) as client:
        response = await client.post("/v1/events", content=json.dumps(body))
    assert response.status_code == 202, response.text


async def run_once(settings: Settings, body: list[dict[str, object]], collector: MqttCollector, expected: int) -> int:
    """Start the agent, post ``body``, wait until ``expected`` messages arrived and the buffer is drained; stop.

    Returns how many duplicates the agent's buffer suppressed in this run.
    """
    topic = f"{PREFIX}/transaction/material.consumed"
    agent = Agent(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await asyncio.wait_for(agent.wait_started(), 10)
        await post_and_deliver(agent, body)
        await wait_for(lambda: len(collector.on_topic(topic)) == expected, message="delivered")
        await wait_for(lambda: agent.buffer.depth("cloud", "transaction") == 0, message="acknowledged")
        return agent.buffer.duplicates_suppressed
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_a_retry_after_restart_and_delivery_is_not_sent_twice(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoBroker]
) -> None:
    (tmp_path / "ingest-token").write_text(TOKEN, encoding="utf-8")
    mosquitto = mosquitto_factory()
    settings = parse_settings(CONFIG.format(data_dir=tmp_path, mqtt_url=mosquitto.url, prefix=PREFIX))
    with MqttCollector(mosquitto.host, mosquitto.port, f"{PREFIX}/transaction/#", client_id="dedupe-e2e") as collector:
        assert await run_once(settings, [consumed(1)], collector, expected=1) == 0
        # Restarted on the same data directory; the MES retries (it never saw the 202) with a new one.
        assert await run_once(settings, [consumed(1), consumed(2)], collector, expected=2) == 1
    messages = collector.on_topic(f"{PREFIX}/transaction/material.consumed")
    ids = [json.loads(message.payload)["id"] for message in messages]
    # The second run's new event came after the retry, in sequence order: a second copy would have come first.
    assert ids == ["mes-consumed-1", "mes-consumed-2"]
