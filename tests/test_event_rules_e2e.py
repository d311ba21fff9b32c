"""End to end: a GS1 scan at a receiving dock (a real TCP scanner) fires an event-triggered rule.

The scan's own ``goods.received`` and the rule's ``inventory.moved`` (lot and
quantity from the scan) both reach a JSON Lines sink through the buffer.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec

from agent.events import CloudEvent
from agent.pipeline import Agent
from agent.settings import parse_settings
from protocols.barcode.simulator import ScannerSimulator
from tests.peers.modbus_server import free_port
from tests.peers.waiting import wait_for

GS = "\x1d"
GTIN = "05012345678900"

CONFIG = """
[agent]
site = "plant-scan"
id = "gw-scan"
data_dir = "{data_dir}"

[http]
listen = "127.0.0.1:0"

[[sources.barcode]]
name = "dock1"
mode = "tcp-server"
listen = "127.0.0.1:{port}"
station = "receiving-dock-1"
event = "goods.received"

[[transactions]]
name = "putaway"
when_event = "goods.received"
when_source = "dock1"
type = "inventory.moved"
  [transactions.fields]
  item = {{ event = "gtin" }}
  lot = {{ event = "lot" }}
  quantity = {{ event = "quantity" }}
  from_location = {{ literal = "DOCK-1" }}
  to_location = {{ template = "STORE-{{event.lot}}" }}

[[sinks.jsonl]]
name = "file"
path = "{events}"
"""


def lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    found = []
    for line in path.read_bytes().splitlines():
        msgspec.json.decode(line, type=CloudEvent)  # a valid CloudEvent
        found.append(msgspec.json.decode(line))
    return found


def of_type(path: Path, name: str) -> list[dict[str, Any]]:
    return [event for event in lines(path) if event["type"] == f"io.plantgate.{name}"]


async def test_a_dock_scan_gives_the_scan_and_the_rules_inventory_move_once(tmp_path: Path) -> None:
    port = free_port()
    events = tmp_path / "events.jsonl"
    settings = parse_settings(CONFIG.format(data_dir=tmp_path / "data", port=port, events=events))
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
        receipt = f"]C101{GTIN}{GS}10LOT-42{GS}3724"
        async with ScannerSimulator(connect=f"127.0.0.1:{port}") as scanner:
            await scanner.scan(receipt)
            await wait_for(
                lambda: of_type(events, "goods.received") and of_type(events, "inventory.moved"),
                timeout=15,
                message=lambda: str(lines(events)),
            )
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)

    [received] = of_type(events, "goods.received")
    [moved] = of_type(events, "inventory.moved")
    assert received["data"]["lot"] == "LOT-42" and received["data"]["quantity"] == {"value": "24", "uom": "EA"}
    assert moved["data"] == {
        "item": GTIN,
        "lot": "LOT-42",
        "quantity": {"value": "24", "uom": "EA"},
        "from_location": "DOCK-1",
        "to_location": "STORE-LOT-42",
    }
    assert moved["source"] == "plantgate/plant-scan/gw-scan/dock1" and moved["lane"] == "transaction"
    assert moved["time"] == received["time"] and moved["id"] != received["id"]
    assert moved["subject"] == "LOT-42"
