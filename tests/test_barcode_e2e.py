"""End to end: scanners (TCP client, TCP server, serial pty) -> the agent -> the buffer -> a real mosquitto.

The station's work order comes from a real OPC UA press (the simulator), read by
the agent's OPC UA source, at the time of the scan.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from agent.events import CloudEvent
from agent.pipeline import Agent
from agent.settings import parse_settings
from agent.simulator import PressSimulator
from protocols.barcode.simulator import ScannerSimulator
from tests.peers.mosquitto import MosquittoBroker, MqttCollector, free_port
from tests.peers.waiting import wait_for

PREFIX = "plantgate/plant-scan"
GS = "\x1d"
GTIN = "05012345678900"

CONFIG = """
[agent]
site = "plant-scan"
id = "gw-scan"
data_dir = "{data_dir}"

[http]
listen = "127.0.0.1:0"

[[sources.opcua]]
name = "press7"
endpoint = "{endpoint}"
publishing_interval = "50ms"

  [[sources.opcua.tags]]
  tag = "press7.work_order"
  node = "ns=2;s=Press7.WorkOrder"
  kind = "value"

[[sources.barcode]]
name = "dock1"
mode = "tcp-server"
listen = "127.0.0.1:{listen_port}"
station = "receiving-dock-1"
event = "goods.received"
work_order_tag = "press7.work_order"

[[sources.barcode]]
name = "line2"
mode = "tcp-client"
connect = "{scanner}"
station = "line-2-feed"
event = "material.consumed"
work_order_tag = "press7.work_order"
reconnect_max_backoff = "500ms"

[[sources.barcode]]
name = "bench3"
mode = "serial"
device = "{device}"
baudrate = 115200
terminator = "CRLF"
station = "qa-bench-3"

[[sinks.mqtt]]
name = "cloud"
url = "{mqtt_url}"
topic_prefix = "{prefix}"
"""


def events_on(collector: MqttCollector, topic: str) -> list[dict[str, Any]]:
    found = []
    for message in collector.on_topic(f"{PREFIX}/{topic}"):
        msgspec.json.decode(message.payload, type=CloudEvent)  # a valid CloudEvent
        found.append(msgspec.json.decode(message.payload))
    return found


@pytest.fixture
async def pty_device() -> AsyncIterator[tuple[int, str]]:
    master, slave = os.openpty()
    try:
        yield master, os.ttyname(slave)
    finally:
        os.close(master)
        os.close(slave)


async def test_scans_from_every_mode_reach_the_broker_with_the_station_work_order(
    tmp_path: Path,
    press_server: PressSimulator,
    mosquitto: MosquittoBroker,
    mqtt_collector: MqttCollector,
    pty_device: tuple[int, str],
) -> None:
    master, device = pty_device
    listen_port = free_port()
    async with ScannerSimulator() as line_scanner:
        settings = parse_settings(
            CONFIG.format(
                data_dir=tmp_path / "data",
                endpoint=press_server.endpoint,
                listen_port=listen_port,
                scanner=line_scanner.address,
                device=device,
                mqtt_url=mosquitto.url,
                prefix=PREFIX,
            )
        )
        agent = Agent(settings)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            await asyncio.wait_for(agent.wait_started(), 10)
            await wait_for(
                lambda: all(s.status.state == "connected" for s in agent.sources),
                timeout=15,
                message=lambda: str([s.status for s in agent.sources]),
            )
            await press_server.write("WorkOrder", "4711")
            await wait_for(lambda: getattr(agent.rules.current.get("press7.work_order"), "value", None) == "4711")

            async with ScannerSimulator(connect=f"127.0.0.1:{listen_port}") as dock_scanner:
                receipt = f"]C101{GTIN}{GS}10LOT-42{GS}17270131{GS}3724"
                await dock_scanner.scan(receipt)
                await dock_scanner.scan(receipt)  # a double read: suppressed
                await dock_scanner.scan(b"]C1012345\x00")  # garbled
                await wait_for(lambda: line_scanner.connected == 1)
                await line_scanner.scan(f"]d201{GTIN}10B-7{GS}21SN-1")
                os.write(master, b"]Q1BENCH-CHECK-9\r\n")
                await wait_for(
                    lambda: (
                        events_on(mqtt_collector, "transaction/goods.received")
                        and events_on(mqtt_collector, "transaction/material.consumed")
                        and events_on(mqtt_collector, "operational/barcode.scanned")
                        and events_on(mqtt_collector, "operational/barcode.rejected")
                    ),
                    timeout=15,
                    message=lambda: str([m.topic for m in mqtt_collector.snapshot()]),
                )
            status = {s.name: s.status.info for s in agent.sources}
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

    [received] = events_on(mqtt_collector, "transaction/goods.received")
    assert received["source"] == "plantgate/plant-scan/gw-scan/dock1"
    assert received["subject"] == "4711" and received["partitionkey"] == "4711"
    assert received["data"] == {
        "station": "receiving-dock-1",
        "raw": f"]C101{GTIN}{GS}10LOT-42{GS}17270131{GS}3724",
        "gtin": GTIN,
        "lot": "LOT-42",
        "expiry": "2027-01-31",
        "quantity": {"value": "24", "uom": "EA"},
        "work_order": "4711",
    }
    [consumed] = events_on(mqtt_collector, "transaction/material.consumed")
    assert consumed["data"]["work_order"] == "4711" and consumed["data"]["serial"] == "SN-1"
    assert consumed["data"]["station"] == "line-2-feed" and consumed["lane"] == "transaction"
    [scanned] = events_on(mqtt_collector, "operational/barcode.scanned")
    assert scanned["data"] == {"station": "qa-bench-3", "raw": "]Q1BENCH-CHECK-9"}
    assert scanned["subject"] == "qa-bench-3"
    [rejected] = events_on(mqtt_collector, "operational/barcode.rejected")
    assert rejected["data"]["raw"] == "]C1012345\\x00" and rejected["data"]["station"] == "receiving-dock-1"
    assert status["dock1"]["duplicates_suppressed"] == "1" and status["dock1"]["scans"] == "1"
