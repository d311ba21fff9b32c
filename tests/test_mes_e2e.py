"""End to end: the MES webhook and the MES poll -> the buffer -> a real mosquitto -> a subscriber.

Events posted while the broker is down are answered 202 (committed), kept in the
buffer and published once the broker is back, under their ids.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import httpx

from agent.pipeline import Agent
from agent.settings import parse_settings
from tests.peers.mes_server import MesRestServer
from tests.peers.mosquitto import MosquittoBroker, MqttCollector
from tests.peers.waiting import wait_for

TOKEN = "e2e-ingest-token"
PREFIX = "plantgate/plant-mesx"

CONFIG = """
[agent]
site = "plant-mesx"
id = "gw-mesx"
data_dir = "{data_dir}"

[http]
listen = "127.0.0.1:0"
ingest_token_file = "ingest-token"

[[sources.mes]]
name = "mes"
mode = "webhook"

[[sources.mes]]
name = "mes-rest"
mode = "poll"
url = "{rest_url}"
interval = "200ms"
records = "$.records"
next = "$.next"
cursor_field = "$.id"
mapping = "confirmations"

  [sources.mes.mappings.confirmations]
  type = "production.completed"
  id = "$.confirmation"
  time = "$.postedAt"
  fields = {{ work_order = "$.order", item = "$.material", quantity = "$.qty" }}
  uom = "$.unit"

[[sinks.mqtt]]
name = "cloud"
url = "{mqtt_url}"
topic_prefix = "{prefix}"
reconnect_max_backoff = "300ms"
"""


def consumed(n: int) -> dict[str, object]:
    return {
        "specversion": "1.0",
        "id": f"e2e-consumed-{n}",
        "source": "mes://plant/mes",
        "type": "io.plantgate.material.consumed",
        "time": "2026-12-04T10:00:00Z",
        "subject": f"WO-{n}",
        "correlationid": f"corr-{n}",
        "data": {"work_order": f"WO-{n}", "item": "RAW-7", "quantity": {"value": f"{n}.5", "uom": "KGM"}},
    }


async def test_webhook_and_poll_events_reach_mqtt_through_the_buffer(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoBroker]
) -> None:
    (tmp_path / "ingest-token").write_text(TOKEN, encoding="utf-8")
    # Persistent session: what the agent publishes before the subscriber is back after the outage is kept.
    mosquitto = mosquitto_factory(persistence=True)
    consumed_topic = f"{PREFIX}/transaction/material.consumed"
    completed_topic = f"{PREFIX}/transaction/production.completed"
    topics = f"{PREFIX}/transaction/#"
    with MqttCollector(mosquitto.host, mosquitto.port, topics, client_id="mes-e2e", clean_session=False) as collector:
        async with MesRestServer(5, page_size=2) as rest:
            text = CONFIG.format(data_dir=tmp_path, rest_url=rest.url, mqtt_url=mosquitto.url, prefix=PREFIX)
            agent = Agent(parse_settings(text))
            stop = asyncio.Event()
            task = asyncio.create_task(agent.run(stop))
            try:
                await asyncio.wait_for(agent.wait_started(), 10)
                assert agent.http is not None
                headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/cloudevents-batch+json"}
                async with httpx.AsyncClient(base_url=agent.http.url, headers=headers, timeout=10) as client:
                    response = await client.post("/v1/events", content=json.dumps([consumed(1), consumed(2)]))
                    assert response.status_code == 202
                    await wait_for(lambda: len(collector.on_topic(consumed_topic)) == 2, message="webhook events")
                    await wait_for(lambda: len(collector.on_topic(completed_topic)) == 5, message="polled records")

                    mosquitto.stop()  # the cloud link is down: the MES is still acknowledged, from the buffer
                    response = await client.post("/v1/events", content=json.dumps([consumed(3)]))
                    assert response.status_code == 202
                    rest.add(2)
                    await wait_for(lambda: agent.buffer.depth("cloud", "transaction") >= 3, message="buffered")
                    mosquitto.start()
                    await wait_for(
                        lambda: (
                            len(collector.on_topic(consumed_topic)) >= 3
                            and len(collector.on_topic(completed_topic)) >= 7
                        ),
                        timeout=20,
                        message=lambda: f"after the outage: {len(collector.snapshot())} messages",
                    )
            finally:
                stop.set()
                await asyncio.wait_for(task, 30)
    events = [json.loads(message.payload) for message in collector.snapshot()]
    by_id = {event["id"]: event for event in events}
    assert {f"e2e-consumed-{n}" for n in (1, 2, 3)} <= set(by_id)
    first = by_id["e2e-consumed-1"]
    assert first["source"] == "plantgate/plant-mesx/gw-mesx/mes"
    assert first["originsource"] == "mes://plant/mes"
    assert first["correlationid"] == "corr-1"
    assert first["data"]["quantity"] == {"value": "1.5", "uom": "KGM"}
    polled = [event for event in events if event["type"] == "io.plantgate.production.completed"]
    assert {event["subject"] for event in polled} == {f"WO-{n:05d}" for n in range(1, 8)}
    assert all(event["source"] == "plantgate/plant-mesx/gw-mesx/mes-rest" for event in polled)
    assert len({event["id"] for event in polled}) == 7
