"""End to end: a filler behind a real Modbus TCP server -> the agent -> a real mosquitto -> a subscriber.

The transaction's quantity is the filler's good-count counter: what it counted since
the previous cycle, across a counter reset. The ack coil is written after the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from agent.pipeline import Agent
from agent.settings import parse_settings
from protocols.modbus.simulator import FillerSimulator
from tests.peers.mosquitto import MosquittoBroker, MqttCollector
from tests.peers.waiting import wait_for

PREFIX = "plantgate/plant-e2e"
COMPLETED = f"{PREFIX}/transaction/production.completed"

CONFIG = """
[agent]
site = "plant-e2e"
id = "gw-e2e"
data_dir = "{data_dir}"

[http]
listen = "127.0.0.1:0"

[[sources.modbus]]
name = "filler2"
endpoint = "{endpoint}"
unit = 1
poll_interval = "50ms"
timeout = "500ms"
reconnect_max_backoff = "500ms"

  [[sources.modbus.tags]]
  tag = "filler2.good_count"
  register = "holding:0"
  type = "uint32"
  kind = "counter"

  [[sources.modbus.tags]]
  tag = "filler2.state"
  register = "holding:2"
  kind = "state"
  states = {{ 0 = "stopped", 1 = "running", 2 = "fault" }}

  [[sources.modbus.tags]]
  tag = "filler2.fill_weight"
  register = "holding:4"
  type = "float32"
  deadband = 0.5

  [[sources.modbus.tags]]
  tag = "filler2.work_order"
  register = "holding:10"
  type = "uint32"
  kind = "value"

  [[sources.modbus.tags]]
  tag = "filler2.item"
  register = "holding:20"
  type = "string:8"
  kind = "value"

  [[sources.modbus.tags]]
  tag = "filler2.cycle_done"
  register = "coil:0"
  kind = "value"

  [[sources.modbus.tags]]
  tag = "filler2.cycle_ack"
  register = "coil:1"
  kind = "value"

[[transactions]]
name = "filler2-output"
when = "filler2.cycle_done"
type = "production.completed"
fields = {{ work_order = "filler2.work_order", item = "filler2.item", quantity = "filler2.good_count" }}
uom = "pcs"
ack = "filler2.cycle_ack"

[mappings.items]
"FILL-500" = "40012345000017"

[mappings.uom]
"pcs" = "EA"

[[sinks.mqtt]]
name = "cloud"
url = "{mqtt_url}"
topic_prefix = "{prefix}"
reconnect_max_backoff = "1s"
"""


@contextlib.asynccontextmanager
async def running_agent(tmp_path: Path, filler: FillerSimulator, broker: MosquittoBroker) -> AsyncIterator[Agent]:
    text = CONFIG.format(data_dir=tmp_path / "data", endpoint=filler.endpoint, mqtt_url=broker.url, prefix=PREFIX)
    agent = Agent(parse_settings(text))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await asyncio.wait_for(agent.wait_started(), 10)
        await wait_for(lambda: all(s.status.state == "connected" for s in agent.sources), timeout=10)
        await wait_for(lambda: "filler2.cycle_done" in agent.rules.current, timeout=10)
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def completions(collector: MqttCollector) -> list[dict[str, Any]]:
    messages = [m for m in collector.snapshot() if m.topic == COMPLETED]
    events: list[dict[str, Any]] = [msgspec.json.decode(m.payload) for m in messages]
    return sorted(events, key=lambda event: event["sequence"])


async def test_filler_cycles_reach_the_broker_with_counted_quantities_and_acks(
    tmp_path: Path, mosquitto: MosquittoBroker, mqtt_collector: MqttCollector
) -> None:
    filler = FillerSimulator()
    await filler.start()
    try:
        filler.add_good(65530)  # counted before the agent started: not part of any cycle
        filler.set_state(1)
        filler.set_fill_weight(500.2)
        async with running_agent(tmp_path, filler, mosquitto) as agent:
            assert await filler.complete_cycle(81001, 24, wait_ack=10)
            assert await filler.complete_cycle(81001, 30, wait_ack=10)
            filler.reset_counter()  # a new shift: the counter restarts at zero
            await wait_for(lambda: agent.rules.current["filler2.good_count"].value == 0, timeout=5)
            assert await filler.complete_cycle(81002, 12, wait_ack=10)
            await wait_for(lambda: len(completions(mqtt_collector)) >= 3, timeout=15)
            source = agent.sources[0]
            assert source.status.state == "connected"
            assert source.status.degraded == {}
            assert source.status.info["requests_per_poll"] == "2"  # coil:0-1, holding:0-27 (gaps bridged)
        events = completions(mqtt_collector)
        assert [e["data"]["work_order"] for e in events] == ["81001", "81001", "81002"]
        assert [e["data"]["quantity"] for e in events] == [
            {"value": "24", "uom": "EA"},
            {"value": "30", "uom": "EA"},
            {"value": "12", "uom": "EA"},
        ]
        assert all(e["data"]["item"] == "40012345000017" for e in events)
        assert all(e["source"] == "plantgate/plant-e2e/gw-e2e/filler2" for e in events)
        assert len({e["id"] for e in events}) == 3
        assert filler.acknowledged == [("81001", 24), ("81001", 30), ("81002", 12)]
        samples = [
            sample
            for m in mqtt_collector.snapshot()
            if m.topic == f"{PREFIX}/telemetry/telemetry.samples"
            for sample in msgspec.json.decode(m.payload)["data"]["samples"]
        ]
        assert {"tag": "filler2.fill_weight", "value": 500.2} in [
            {"tag": s["tag"], "value": s["value"]} for s in samples
        ]
        counts = [s["value"] for s in samples if s["tag"] == "filler2.good_count"]
        assert counts[0] == 65530 and 0 in counts  # a counter's sample is its absolute value
    finally:
        await filler.stop()


async def test_bottles_counted_while_the_agent_was_down_are_reported_once_by_the_next_cycle(
    tmp_path: Path, mosquitto: MosquittoBroker, mqtt_collector: MqttCollector
) -> None:
    filler = FillerSimulator()
    await filler.start()
    try:
        filler.add_good(1000)  # before the first start: not part of any cycle
        async with running_agent(tmp_path, filler, mosquitto):
            assert await filler.complete_cycle(81001, 24, wait_ack=10)
            await wait_for(lambda: len(completions(mqtt_collector)) >= 1, timeout=15)
        filler.add_good(40)  # the line runs on while the agent is stopped
        async with running_agent(tmp_path, filler, mosquitto):  # same data dir: the counter state is back
            assert await filler.complete_cycle(81002, 12, wait_ack=10)
            await wait_for(lambda: len(completions(mqtt_collector)) >= 2, timeout=15)
        events = completions(mqtt_collector)
        # The second cycle reports its 12 bottles plus the 40 counted meanwhile: nothing lost, nothing twice.
        assert [e["data"]["quantity"]["value"] for e in events] == ["24", "52"]
    finally:
        await filler.stop()


NOTHING_TO_STORE = {
    # The rule's condition does not hold (the filler is stopped): no event, the line goes on.
    "condition-not-met": CONFIG.replace(
        'ack = "filler2.cycle_ack"',
        'ack = "filler2.cycle_ack"\ncondition = {{ tag = "filler2.state", equals = "running" }}',
    ),
    # No sink takes the transaction lane (the last section is the MQTT sink): nothing to store.
    "lane-not-taken": CONFIG + 'lanes = ["telemetry", "operational"]\n',
}


@pytest.mark.parametrize("case", sorted(NOTHING_TO_STORE))
async def test_a_cycle_with_nothing_to_store_is_still_acknowledged_to_the_plc(
    tmp_path: Path, mosquitto: MosquittoBroker, mqtt_collector: MqttCollector, case: str
) -> None:
    filler = FillerSimulator()
    await filler.start()
    try:
        filler.set_state(0)  # stopped
        text = NOTHING_TO_STORE[case]
        assert text != CONFIG
        settings = parse_settings(
            text.format(data_dir=tmp_path / "data", endpoint=filler.endpoint, mqtt_url=mosquitto.url, prefix=PREFIX)
        )
        agent = Agent(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            await asyncio.wait_for(agent.wait_started(), 10)
            await wait_for(lambda: "filler2.cycle_done" in agent.rules.current, timeout=10)
            assert await filler.complete_cycle(81009, 5, wait_ack=10), "the PLC waits for its ack"
            assert await filler.complete_cycle(81010, 6, wait_ack=10)
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
        assert completions(mqtt_collector) == []
    finally:
        await filler.stop()
