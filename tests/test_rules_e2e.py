"""Every canonical transaction type from a real OPC UA press and a real Modbus filler to a real mosquitto.

One ``plantgate run`` child with an OPC UA source (``PressSimulator``), a Modbus
source (``ModbusPeer``), 13 ``[[transactions]]`` (rising, falling, change and
increment triggers, a condition, templates, unit conversions, explicit partition
keys), ``[mappings.items]`` with an obsolete code, and ``[[sequencing]]`` holding
``material.consumed`` until its work order is released. The PLCs are driven so
each rule fires once; a consumption posted before its release is held across a
SIGTERM restart and arrives after the release; the obsolete item is a dead letter
until the mapping is rewritten, SIGHUP reloads it and ``plantgate buffer replay
--reason obsolete`` delivers it under its original id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from asyncua import ua

from agent.simulator import PressSimulator
from tests.peers.modbus_server import ModbusPeer
from tests.peers.mosquitto import MosquittoBroker, MqttCollector, free_port
from tests.peers.waiting import wait_for

PREFIX = "plantgate/plant-rules"
OBSOLETE = '"OLD-9" = { obsolete = true }'
MAPPED = '"OLD-9" = "40000000000097"'

CONFIG = """\
[agent]
site = "plant-rules"
id = "gw-rules"
data_dir = "{data_dir}"

[http]
listen = "127.0.0.1:{http_port}"

[[sources.opcua]]
name = "press"
endpoint = "{opcua}"
publishing_interval = "50ms"
reconnect_max_backoff = "500ms"
{opcua_tags}

[[sources.modbus]]
name = "filler"
endpoint = "{modbus}"
unit = 1
poll_interval = "50ms"
timeout = "500ms"
reconnect_max_backoff = "500ms"
{modbus_tags}

[[transactions]]
name = "filler-released"
when = "filler.order_loaded"
on = "rising"
type = "workorder.released"
fields.work_order = {{ template = "WO-{{filler.order_no}}" }}
fields.item = {{ literal = "RM-1" }}
fields.planned_quantity = "filler.planned"
uom = "EA"

[[transactions]]
name = "press-started"
when = "press.state"
on = "change"
condition = {{ tag = "press.state", equals = "running" }}
type = "workorder.started"
fields = {{ work_order = "press.wo", work_center = {{ literal = "PRESS-7" }} }}

[[transactions]]
name = "press-paused"
when = "press.running"
on = "falling"
type = "workorder.paused"
fields = {{ work_order = "press.wo", reason = "press.pause_reason" }}

[[transactions]]
name = "filler-order-completed"
when = "filler.order_done"
type = "workorder.completed"
fields = {{ work_order = {{ template = "WO-{{filler.order_no}}" }}, quantity = "filler.planned" }}
uom = "EA"

[[transactions]]
name = "press-consumption"
when = "press.dose_done"
type = "material.consumed"
fields = {{ work_order = "press.wo", item = "press.component", quantity = "press.dosed_grams" }}
uom = "GRM"
uom_to = "KGM"

[[transactions]]
name = "press-received"
when = "press.unload_done"
type = "goods.received"
condition = {{ tag = "press.state", in = ["running", "paused"] }}
fields.item = "press.component"
fields.lot = "press.lot"
fields.quantity = "press.net_weight"
fields.location = {{ literal = "RM-DOCK1" }}
uom = "KGM"

[[transactions]]
name = "filler-output"
when = "filler.good_count"
on = "increment"
type = "production.completed"
fields.work_order = {{ template = "WO-{{filler.order_no}}" }}
fields.quantity = "filler.good_count"
uom = "EA"

[[transactions]]
name = "filler-rejects"
when = "filler.reject_count"
on = "increment"
type = "scrap.declared"
fields.work_order = {{ template = "WO-{{filler.order_no}}" }}
fields.scrap_quantity = "filler.reject_count"
fields.reason = {{ literal = "underfill" }}
uom = "EA"

[[transactions]]
name = "press-hold"
when = "press.over_temperature"
on = "rising"
type = "quality.hold.placed"
fields.lot = "press.lot"
fields.reason = {{ template = "over temperature in zone {{press.zone}}" }}

[[transactions]]
name = "press-hold-released"
when = "press.over_temperature"
on = "falling"
type = "quality.hold.released"
fields = {{ lot = "press.lot" }}

[[transactions]]
name = "press-transfer"
when = "press.transfer_done"
type = "inventory.moved"
fields.item = "press.transfer_item"
fields.lot = "press.lot"
fields.quantity = "press.pieces"
fields.from_location = {{ literal = "WIP-1" }}
fields.to_location = {{ literal = "FG-2" }}
uom = "PCE"

[[transactions]]
name = "filler-adjusted"
when = "filler.count_done"
type = "inventory.adjusted"
fields.item = {{ literal = "RM-1" }}
fields.quantity = "filler.correction_t"
fields.location = {{ literal = "SILO-4" }}
uom = "TNE"
uom_to = "KGM"
partitionkey = {{ literal = "SILO-4" }}

[[transactions]]
name = "filler-shipped"
when = "filler.truck_loaded"
type = "shipment.confirmed"
fields = {{ shipment = {{ template = "SHP-{{filler.shipment_no}}" }}, quantity = "filler.pallets" }}
uom = "EA"
partitionkey = {{ template = "SHP-{{filler.shipment_no}}" }}

[[sequencing]]
type = "material.consumed"
after = ["workorder.released", "workorder.started"]
hold = "10m"

[mappings]
unknown_items = "pass"

[mappings.items]
"RM-1" = "40000000000011"
{item}

[[sinks.mqtt]]
name = "cloud"
url = "{mqtt_url}"
topic_prefix = "{prefix}"
reconnect_max_backoff = "500ms"
"""

# OPC UA variables of the press: name -> (initial value, variant type, tag kind).
PRESS_VARIABLES: dict[str, tuple[Any, ua.VariantType, str]] = {
    "Wo": ("", ua.VariantType.String, "value"),
    "Component": ("", ua.VariantType.String, "value"),
    "DosedGrams": (0.0, ua.VariantType.Double, "value"),
    "DoseDone": (False, ua.VariantType.Boolean, "value"),
    "Mode": (0, ua.VariantType.Int32, "state"),
    "Running": (False, ua.VariantType.Boolean, "value"),
    "PauseReason": ("", ua.VariantType.String, "value"),
    "Lot": ("", ua.VariantType.String, "value"),
    "NetWeight": (0.0, ua.VariantType.Double, "value"),
    "UnloadDone": (False, ua.VariantType.Boolean, "value"),
    "OverTemperature": (False, ua.VariantType.Boolean, "value"),
    "Zone": (0, ua.VariantType.Int32, "value"),
    "TransferItem": ("", ua.VariantType.String, "value"),
    "Pieces": (0, ua.VariantType.Int32, "value"),
    "TransferDone": (False, ua.VariantType.Boolean, "value"),
}
PRESS_TAGS = {
    "Wo": "press.wo",
    "Component": "press.component",
    "DosedGrams": "press.dosed_grams",
    "DoseDone": "press.dose_done",
    "Mode": "press.state",
    "Running": "press.running",
    "PauseReason": "press.pause_reason",
    "Lot": "press.lot",
    "NetWeight": "press.net_weight",
    "UnloadDone": "press.unload_done",
    "OverTemperature": "press.over_temperature",
    "Zone": "press.zone",
    "TransferItem": "press.transfer_item",
    "Pieces": "press.pieces",
    "TransferDone": "press.transfer_done",
}
# Modbus registers of the filler: tag -> (register, type, kind).
FILLER_TAGS: dict[str, tuple[str, str, str]] = {
    "filler.order_no": ("holding:0", "uint16", "value"),
    "filler.planned": ("holding:1", "uint16", "value"),
    "filler.good_count": ("holding:2", "uint16", "counter"),
    "filler.reject_count": ("holding:3", "uint16", "counter"),
    "filler.correction_t": ("holding:4", "uint16", "value"),
    "filler.shipment_no": ("holding:5", "uint16", "value"),
    "filler.pallets": ("holding:6", "uint16", "value"),
    "filler.order_loaded": ("coil:0", "bool", "value"),
    "filler.order_done": ("coil:1", "bool", "value"),
    "filler.count_done": ("coil:2", "bool", "value"),
    "filler.truck_loaded": ("coil:3", "bool", "value"),
}


def opcua_tags() -> str:
    blocks = []
    for name, tag in PRESS_TAGS.items():
        kind = PRESS_VARIABLES[name][2]
        states = '\n  states = { 0 = "stopped", 1 = "running", 2 = "paused" }' if kind == "state" else ""
        blocks.append(
            f'  [[sources.opcua.tags]]\n  tag = "{tag}"\n  node = "{PressSimulator.node_id(name)}"\n'
            f'  kind = "{kind}"{states}\n'
        )
    return "\n" + "\n".join(blocks)


def modbus_tags() -> str:
    blocks = []
    for tag, (register, vtype, kind) in FILLER_TAGS.items():
        typed = f'\n  type = "{vtype}"' if register.startswith("holding") else ""
        blocks.append(
            f'  [[sources.modbus.tags]]\n  tag = "{tag}"\n  register = "{register}"{typed}\n  kind = "{kind}"\n'
        )
    return "\n" + "\n".join(blocks)


def plantgate() -> str:
    return str(Path(sys.executable).parent / "plantgate")


class Plant:
    """The PLCs, the broker's subscriber and the agent's config file and process."""

    def __init__(self, directory: Path, press: PressSimulator, filler: ModbusPeer, broker: MosquittoBroker):
        self.directory = directory
        self.press = press
        self.filler = filler
        self.broker = broker
        self.http_port = free_port()
        self.config = directory / "plantgate.toml"
        self.log = directory / "agent.log"
        self.process: asyncio.subprocess.Process | None = None
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.http_port}", timeout=10)

    def write_config(self, item: str) -> None:
        self.config.write_text(
            CONFIG.format(
                data_dir=self.directory,
                http_port=self.http_port,
                opcua=self.press.endpoint,
                opcua_tags=opcua_tags(),
                modbus=self.filler.endpoint,
                modbus_tags=modbus_tags(),
                item=item,
                mqtt_url=self.broker.url,
                prefix=PREFIX,
            ),
            encoding="utf-8",
        )

    def agent_log(self) -> str:
        return self.log.read_text(encoding="utf-8") if self.log.exists() else ""

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                plantgate(), "run", "-c", str(self.config), "--log-format", "json", stderr=log
            )
        process = self.process

        async def ready() -> bool:
            assert process.returncode is None, self.agent_log()
            with contextlib.suppress(httpx.TransportError):
                response = await self.client.get("/status")
                if response.status_code != 200:
                    return False
                sources = response.json()["sources"]
                return bool(sources) and all(source["state"] == "connected" for source in sources.values())
            return False

        await wait_for(ready, timeout=20, interval=0.05, message=lambda: f"agent up: {self.agent_log()[-2000:]}")

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 20)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def status(self) -> dict[str, Any]:
        response = await self.client.get("/status")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def held(self) -> int:
        count: int = (await self.status())["buffer"]["held"]["count"]
        return count

    async def dead_letters(self) -> int:
        count: int = (await self.status())["buffer"]["dead_letters"]
        return count

    async def press_write(self, **values: Any) -> None:
        """Field values first, each with its own later source timestamp, as the PLC program writes them."""
        for name, value in values.items():
            await self.press.write(name, value)

    async def filler_set(self, block: str, address: int, *values: int | bool) -> None:
        """Set filler memory and wait until the agent's poll has read it (the server applies it on a read)."""
        self.filler.set(block, address, list(values))
        await wait_for(lambda: self.filler.get(block, address, len(values)) == list(values), timeout=5)
        # One more read of the block after the edit, so the agent holds the value before a trigger.
        served = self.filler.count()
        await wait_for(lambda: self.filler.count() >= served + 4, timeout=5)

    async def filler_pulse(self, coil: int) -> None:
        await self.filler_set("coil", coil, True)
        await self.filler_set("coil", coil, False)


@contextlib.asynccontextmanager
async def plant(directory: Path, broker: MosquittoBroker) -> AsyncIterator[Plant]:
    async with PressSimulator() as press, ModbusPeer().tcp() as filler:
        for name, (value, vtype, _kind) in PRESS_VARIABLES.items():
            await press.add_variable(name, value, vtype)
        running = Plant(directory, press, filler, broker)
        try:
            yield running
        finally:
            await running.stop()
            await running.client.aclose()


def events(collector: MqttCollector) -> list[dict[str, Any]]:
    return [json.loads(m.payload) for m in collector.snapshot() if m.topic.startswith(f"{PREFIX}/transaction/")]


def of_type(collector: MqttCollector, kind: str) -> list[dict[str, Any]]:
    return [e for e in events(collector) if e["type"] == f"io.plantgate.{kind}"]


def _non_telemetry(collector: MqttCollector) -> list[bytes]:
    return [m.payload for m in collector.snapshot() if b"telemetry" not in m.payload]


async def arrived(collector: MqttCollector, kind: str) -> dict[str, Any]:
    found = await wait_for(
        lambda: of_type(collector, kind),
        timeout=10,
        message=lambda: f"a {kind} at the broker; got {_non_telemetry(collector)}",
    )
    return dict(found[0])


async def test_every_transaction_type_reaches_the_broker(
    tmp_path: Path, mosquitto: MosquittoBroker, mqtt_collector: MqttCollector
) -> None:
    async with plant(tmp_path, mosquitto) as site:
        site.write_config(OBSOLETE)
        await site.start()

        # A consumption of WO-1 before its release: held by the sequencing guard.
        await site.press_write(Wo="WO-1", Component="RM-1", DosedGrams=2500.0)
        await site.press_write(DoseDone=True)
        await wait_for(site.held, message="the early consumption is held")
        await site.press_write(DoseDone=False)
        assert of_type(mqtt_collector, "material.consumed") == []

        # Held across a restart: it is in the buffer, not in memory.
        await site.stop()
        await site.start()
        assert await site.held() == 1
        assert (await site.status())["buffer"]["held"]["types"] == {"material.consumed": 1}

        # The release (Modbus, template work order) lets it go, right after it.
        await site.filler_set("holding", 0, 1, 500)
        await site.filler_pulse(0)
        released = await arrived(mqtt_collector, "workorder.released")
        consumed = await arrived(mqtt_collector, "material.consumed")
        assert released["data"]["work_order"] == "WO-1"
        assert released["data"]["planned_quantity"] == {"value": "500", "uom": "EA"}
        assert released["data"]["item"] == "40000000000011"
        assert (released["subject"], released["partitionkey"]) == ("WO-1", "WO-1")
        assert released["source"] == "plantgate/plant-rules/gw-rules/filler"
        assert consumed["data"] == {
            "work_order": "WO-1",
            "item": "40000000000011",
            "quantity": {"value": "2.5", "uom": "KGM"},
        }
        assert (consumed["subject"], consumed["partitionkey"]) == ("WO-1", "WO-1")
        assert consumed["source"] == "plantgate/plant-rules/gw-rules/press"
        assert int(consumed["sequence"]) > int(released["sequence"])
        await wait_for(lambda: _none_held(site), message="nothing held after the release")

        # workorder.started: a change of the state tag, only when it becomes running.
        await site.press_write(Mode=2)
        await wait_for(lambda: _state_seen(mqtt_collector, "paused"), message="the press paused (no event: condition)")
        await site.press_write(Mode=1, Running=True)
        started = await arrived(mqtt_collector, "workorder.started")
        assert started["data"] == {"work_order": "WO-1", "work_center": "PRESS-7"}

        # workorder.paused: the falling edge of Running.
        await site.press_write(PauseReason="tool change")
        await site.press_write(Running=False)
        paused = await arrived(mqtt_collector, "workorder.paused")
        assert paused["data"] == {"work_order": "WO-1", "reason": "tool change"}
        assert paused["partitionkey"] == "WO-1"

        # goods.received: only while the press is running or paused (condition).
        await site.press_write(Lot="L-77", NetWeight=12.5)
        await site.press_write(UnloadDone=True)
        received = await arrived(mqtt_collector, "goods.received")
        assert received["data"] == {
            "item": "40000000000011",
            "lot": "L-77",
            "quantity": {"value": "12.5", "uom": "KGM"},
            "location": "RM-DOCK1",
        }
        assert (received["subject"], received["partitionkey"]) == ("L-77", "L-77")

        # quality hold: placed on the rising edge (a template), released on the falling edge.
        await site.press_write(Zone=3)
        await site.press_write(OverTemperature=True)
        placed = await arrived(mqtt_collector, "quality.hold.placed")
        assert placed["data"] == {"lot": "L-77", "reason": "over temperature in zone 3"}
        await site.press_write(OverTemperature=False)
        lifted = await arrived(mqtt_collector, "quality.hold.released")
        assert lifted["data"] == {"lot": "L-77"}
        assert lifted["partitionkey"] == "L-77"

        # Counters: each increment is a transaction with what was counted.
        await site.filler_set("holding", 2, 40)
        output = await arrived(mqtt_collector, "production.completed")
        assert output["data"] == {"work_order": "WO-1", "quantity": {"value": "40", "uom": "EA"}}
        await site.filler_set("holding", 3, 2)
        scrap = await arrived(mqtt_collector, "scrap.declared")
        assert scrap["data"] == {
            "work_order": "WO-1",
            "scrap_quantity": {"value": "2", "uom": "EA"},
            "reason": "underfill",
        }

        await site.filler_pulse(1)
        completed = await arrived(mqtt_collector, "workorder.completed")
        assert completed["data"] == {"work_order": "WO-1", "quantity": {"value": "500", "uom": "EA"}}

        await site.filler_set("holding", 4, 3)
        await site.filler_pulse(2)
        adjusted = await arrived(mqtt_collector, "inventory.adjusted")
        assert adjusted["data"] == {
            "item": "40000000000011",
            "quantity": {"value": "3000", "uom": "KGM"},
            "location": "SILO-4",
        }
        assert adjusted["partitionkey"] == "SILO-4"

        await site.filler_set("holding", 5, 812, 18)
        await site.filler_pulse(3)
        shipped = await arrived(mqtt_collector, "shipment.confirmed")
        assert shipped["data"] == {"shipment": "SHP-812", "quantity": {"value": "18", "uom": "EA"}}
        assert (shipped["subject"], shipped["partitionkey"]) == ("filler.truck_loaded", "SHP-812")

        # inventory.moved of an obsolete item: a dead letter before any sink.
        await site.press_write(TransferItem="OLD-9", Pieces=6)
        await site.press_write(TransferDone=True)
        await wait_for(site.dead_letters, message="the obsolete item is a dead letter")
        code, listed = await cli("buffer", "dead-letters", "--json", "--sink", "-", "-c", str(site.config))
        assert code == 0, listed
        [dead] = _dead_letters(listed)
        assert "OLD-9" in json.dumps(dead)
        dead_id = dead["id"]
        assert of_type(mqtt_collector, "inventory.moved") == []

        # The mapping is fixed, reloaded on SIGHUP, and the replay delivers it under its id.
        site.write_config(MAPPED)
        assert site.process is not None
        os.kill(site.process.pid, signal.SIGHUP)

        async def replayable() -> bool:
            found = (await site.status())["buffer"]["replayable_dead_letters"]
            return found is not None and found["count"] == 1

        await wait_for(replayable, message="the reload makes the dead letter replayable")
        code, printed = await cli("buffer", "replay", "--reason", "obsolete", "-c", str(site.config))
        assert code == 0, printed
        moved = await arrived(mqtt_collector, "inventory.moved")
        assert moved["id"] == dead_id
        assert moved["data"] == {
            "item": "40000000000097",
            "lot": "L-77",
            "quantity": {"value": "6", "uom": "PCE"},
            "from_location": "WIP-1",
            "to_location": "FG-2",
        }
        assert await site.dead_letters() == 0

        # Each of the 13 types arrived exactly once, each under its own id.
        seen = events(mqtt_collector)
        types = sorted(e["type"].removeprefix("io.plantgate.") for e in seen)
        assert types == sorted(
            [
                "workorder.released",
                "workorder.started",
                "workorder.paused",
                "workorder.completed",
                "material.consumed",
                "goods.received",
                "production.completed",
                "scrap.declared",
                "quality.hold.placed",
                "quality.hold.released",
                "inventory.moved",
                "inventory.adjusted",
                "shipment.confirmed",
            ]
        )
        assert len({e["id"] for e in seen}) == 13
        for event in seen:
            assert event["lane"] == "transaction"
            assert event["site"] == "plant-rules"
        assert all(
            m.topic == f"{PREFIX}/transaction/{json.loads(m.payload)['type'].removeprefix('io.plantgate.')}"
            for m in mqtt_collector.snapshot()
            if m.topic.startswith(f"{PREFIX}/transaction/")
        )


def _state_seen(collector: MqttCollector, state: str) -> bool:
    return any(
        json.loads(m.payload)["data"]["state"] == state
        for m in collector.snapshot()
        if m.topic == f"{PREFIX}/operational/machine.state.changed"
    )


async def _none_held(site: Plant) -> bool:
    return await site.held() == 0


def _dead_letters(printed: str) -> list[dict[str, Any]]:
    parsed = json.loads(printed)
    found: list[dict[str, Any]] = parsed if isinstance(parsed, list) else parsed["dead_letters"]
    return found


async def cli(*args: str) -> tuple[int, str]:
    child = await asyncio.create_subprocess_exec(
        plantgate(), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode is not None
    return child.returncode, out.decode() if child.returncode == 0 else out.decode() + err.decode()
