"""End to end: a real OPC UA press -> the agent -> a real mosquitto -> a subscriber.

Outages are real: the broker process is stopped and started again on the same
port, the OPC UA server is restarted, and the agent itself is ``kill -9``ed.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from agent.events import CloudEvent, traceparent_for
from agent.pipeline import Agent
from agent.settings import Settings, parse_settings
from agent.simulator import PressSimulator
from tests.peers.mosquitto import MosquittoBroker, MqttCollector, Received
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

[[sources.opcua]]
name = "press7"
endpoint = "{endpoint}"
publishing_interval = "50ms"
reconnect_max_backoff = "1s"

  [[sources.opcua.tags]]
  tag = "press7.temperature"
  node = "ns=2;s=Press7.Temperature"
  kind = "telemetry"
  deadband = 0.5

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

[[transactions]]
name = "press7-completion"
when = "press7.cycle_done"
type = "production.completed"
fields = {{ work_order = "press7.work_order", item = "press7.item", quantity = "press7.batch_qty" }}
uom = "pcs"
ack = "press7.cycle_ack"

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


def write_config(tmp_path: Path, press: PressSimulator, broker: MosquittoBroker) -> Path:
    path = tmp_path / "plantgate.toml"
    path.write_text(
        CONFIG.format(data_dir=tmp_path / "data", endpoint=press.endpoint, mqtt_url=broker.url, prefix=PREFIX),
        encoding="utf-8",
    )
    return path


def settings_for(tmp_path: Path, press: PressSimulator, broker: MosquittoBroker) -> Settings:
    return parse_settings(write_config(tmp_path, press, broker).read_text(encoding="utf-8"))


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Agent]:
    """The agent in this event loop, started; drained and stopped on exit."""
    agent = Agent(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await asyncio.wait_for(agent.wait_started(), 10)
        await wait_for(lambda: all(s.status.state == "connected" for s in agent.sources), timeout=15)
        # Wait until the trigger's current value is known, so the first cycle is a real edge.
        await wait_for(lambda: "press7.cycle_done" in agent.rules.current, timeout=10)
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def completions(collector: MqttCollector) -> list[dict[str, Any]]:
    """Every production.completed the subscriber got, parsed as a CloudEvent (fails if one does not)."""
    return [parse_cloudevent(m) for m in collector.snapshot() if m.topic == COMPLETED]


def parse_cloudevent(message: Received) -> dict[str, Any]:
    event = msgspec.json.decode(message.payload, type=CloudEvent)
    assert event.specversion == "1.0"
    assert event.datacontenttype == "application/json"
    assert event.source.startswith("plantgate/plant-e2e/gw-e2e/")
    assert event.sequence is not None and len(event.sequence) == 20 and event.sequence.isdigit()
    expected_topic = f"{PREFIX}/{event.lane}/{event.type.removeprefix('io.plantgate.')}"
    assert message.topic == expected_topic
    raw: dict[str, Any] = msgspec.json.decode(message.payload)
    assert None not in raw.values(), "no null attributes"
    return raw


def assert_all_cloudevents(collector: MqttCollector) -> None:
    for message in collector.snapshot():
        if "/status/" in message.topic:
            status = msgspec.json.decode(message.payload)
            assert status["state"] in ("online", "offline")
            continue
        parse_cloudevent(message)


async def cycles(press: PressSimulator, orders: list[str], *, qty: Callable[[int], float] = lambda i: 10 + i) -> None:
    """Complete one press cycle per entry of ``orders``; each must be acknowledged by the agent."""
    for index, order in enumerate(orders):
        acked = await press.complete_cycle(order, "FILL-500", qty(index), wait_ack=10.0)
        assert acked, f"cycle {index} ({order}) was not acknowledged by the agent"


async def test_cycles_become_transactions_with_fields_ids_and_acks(
    tmp_path: Path, press_server: PressSimulator, mosquitto: MosquittoBroker, mqtt_collector: MqttCollector
) -> None:
    settings = settings_for(tmp_path, press_server, mosquitto)
    orders = [f"WO-{4700 + i // 5}" for i in range(20)]
    async with running(settings):
        await cycles(press_server, orders, qty=lambda i: 12.5 + i)
        await wait_for(lambda: len(completions(mqtt_collector)) >= 20, timeout=15)
    events = completions(mqtt_collector)
    assert len(events) == 20
    assert len({e["id"] for e in events}) == 20
    for index, event in enumerate(sorted(events, key=lambda e: e["sequence"])):
        assert event["type"] == "io.plantgate.production.completed"
        assert event["lane"] == "transaction"
        assert event["subject"] == orders[index]
        assert event["partitionkey"] == orders[index]
        assert event["data"]["work_order"] == orders[index]
        assert event["data"]["item"] == "40012345000017"  # mapped through [mappings.items]
        assert event["data"]["quantity"] == {"value": str(12.5 + index), "uom": "EA"}
        assert event["traceparent"] == traceparent_for(event["id"])  # the agent starts the trace
    started = [parse_cloudevent(m) for m in mqtt_collector.on_topic(f"{PREFIX}/operational/agent.started")]
    assert len(started) == 1, "a sink seen for the first time still gets the agent's start event"
    assert started[0]["sequence"] == "00000000000000000001"
    assert_all_cloudevents(mqtt_collector)


async def test_telemetry_deadband_end_to_end(
    tmp_path: Path, press_server: PressSimulator, mosquitto: MosquittoBroker, mqtt_collector: MqttCollector
) -> None:
    settings = settings_for(tmp_path, press_server, mosquitto)
    written = [100.0, 100.2, 100.4, 100.6, 100.7, 101.2, 101.3, 99.0]
    async with running(settings) as agent:
        for value in written:
            await press_server.set_temperature(value)
            # One change per publish so the server reports each value (its queue would keep them anyway).
            await wait_for(lambda v=value: agent.rules.current["press7.temperature"].value == v, timeout=5)
        await wait_for(
            lambda: 99.0 in samples_of(mqtt_collector, "press7.temperature"),
            timeout=10,
            message=lambda: str(samples_of(mqtt_collector, "press7.temperature")),
        )
    forwarded = samples_of(mqtt_collector, "press7.temperature")
    # The band (0.5) is measured from the last forwarded value, not the last reading.
    assert [v for v in forwarded if v >= 99.0] == [100.0, 100.6, 101.2, 99.0]
    assert_all_cloudevents(mqtt_collector)


def samples_of(collector: MqttCollector, tag: str) -> list[float]:
    values = []
    for message in collector.snapshot():
        if message.topic == f"{PREFIX}/telemetry/telemetry.samples":
            event = parse_cloudevent(message)
            values.extend(s["value"] for s in event["data"]["samples"] if s["tag"] == tag)
    return values


async def test_broker_outage_loses_nothing_and_keeps_order(
    tmp_path: Path, press_server: PressSimulator, mosquitto_factory: Callable[..., MosquittoBroker]
) -> None:
    broker = mosquitto_factory(persistence=True)
    collector = MqttCollector(broker.host, broker.port, COMPLETED, client_id="e2e-outage", clean_session=False)
    collector.start()
    try:
        settings = settings_for(tmp_path, press_server, broker)
        orders = [f"WO-{i % 5}" for i in range(50)]
        async with running(settings) as agent:
            broker.stop()
            await wait_for(lambda: agent.sinks[0].status.state != "connected", timeout=10)
            await cycles(press_server, orders)  # acknowledged = committed, while the broker is away
            assert agent.buffer.depth("cloud", "transaction") >= 50
            broker.start()
            await wait_for(lambda: len(completions(collector)) >= 50, timeout=30)
            await wait_for(lambda: agent.buffer.depth("cloud", "transaction") == 0, timeout=10)
    finally:
        collector.stop()
    events = completions(collector)
    ids = [e["id"] for e in events]
    assert len(set(ids)) == 50, "every cycle delivered, each under its own id"
    quantities_by_order: dict[str, list[str]] = {}
    for event in events:  # arrival order at the subscriber
        quantities_by_order.setdefault(event["partitionkey"], []).append(event["data"]["quantity"]["value"])
    for order, quantities in quantities_by_order.items():
        expected = [str(10 + i) for i in range(50) if orders[i] == order]
        deduped = list(dict.fromkeys(quantities))  # a redelivery after reconnect keeps its id and place
        assert deduped == expected, f"order of {order} broken: {quantities}"


async def test_opcua_server_restart_resumes_events(
    tmp_path: Path, press_server: PressSimulator, mosquitto: MosquittoBroker, mqtt_collector: MqttCollector
) -> None:
    settings = settings_for(tmp_path, press_server, mosquitto)
    async with running(settings) as agent:
        await cycles(press_server, ["WO-1", "WO-1", "WO-1"])
        await press_server.stop()
        await wait_for(lambda: agent.sources[0].status.state != "connected", timeout=15)
        await press_server.start()
        await wait_for(lambda: agent.sources[0].status.state == "connected", timeout=20)
        await wait_for(lambda: agent.rules.current["press7.cycle_done"].value is False, timeout=10)
        await cycles(press_server, ["WO-2", "WO-2", "WO-2"])
        await wait_for(lambda: len(completions(mqtt_collector)) >= 6, timeout=15)
    events = completions(mqtt_collector)
    assert sorted(e["subject"] for e in events) == ["WO-1"] * 3 + ["WO-2"] * 3
    assert len({e["id"] for e in events}) == 6


def plantgate_binary() -> str:
    return str(Path(sys.executable).parent / "plantgate")


async def test_kill_9_during_outage_loses_nothing(
    tmp_path: Path, press_server: PressSimulator, mosquitto_factory: Callable[..., MosquittoBroker]
) -> None:
    broker = mosquitto_factory(persistence=True)
    collector = MqttCollector(broker.host, broker.port, COMPLETED, client_id="e2e-kill", clean_session=False)
    collector.start()
    config = write_config(tmp_path, press_server, broker)
    command = [plantgate_binary(), "run", "-c", str(config)]
    try:
        broker.stop()
        agent = await asyncio.create_subprocess_exec(*command, stderr=subprocess.DEVNULL)
        try:
            await wait_for(lambda: (tmp_path / "data" / "buffer.db").exists(), timeout=20)
            orders = [f"WO-K{i}" for i in range(10)]
            await cycles(press_server, orders)  # each acked by the agent => committed to its buffer
        finally:
            agent.send_signal(signal.SIGKILL)
            await asyncio.wait_for(agent.wait(), 10)
        assert agent.returncode == -signal.SIGKILL
        broker.start()
        restarted = await asyncio.create_subprocess_exec(*command, stderr=subprocess.DEVNULL)
        try:
            await wait_for(lambda: len(completions(collector)) >= 10, timeout=40)
        finally:
            restarted.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(restarted.wait(), 30) == 0, "SIGTERM drains and exits 0"
    finally:
        collector.stop()
    events = completions(collector)
    assert sorted({e["subject"] for e in events}) == sorted(f"WO-K{i}" for i in range(10))
    assert len({e["id"] for e in events}) == 10


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda text: text.replace('kind = "telemetry"', "kind = 5"), "sources.opcua.0.tags.0.kind"),
        (lambda text: text.replace("deadband = 0.5", "deadbnd = 0.5"), "sources.opcua.0.tags.0.deadbnd: unknown key"),
        (lambda text: text.replace("[agent]", "[agent"), ":2: TOML syntax error"),
    ],
    ids=["wrong-type", "unknown-key", "toml-syntax"],
)
def test_bad_config_exits_2_naming_key_or_line(tmp_path: Path, edit: Callable[[str], str], expected: str) -> None:
    text = CONFIG.format(
        data_dir=tmp_path, endpoint="opc.tcp://127.0.0.1:4840", mqtt_url="mqtt://127.0.0.1:1883", prefix=PREFIX
    )
    path = tmp_path / "bad.toml"
    path.write_text(edit(text), encoding="utf-8")
    result = subprocess.run([plantgate_binary(), "run", "-c", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"plantgate: {path}")
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


async def test_ready_with_every_sink_down_and_status_names_everything(
    tmp_path: Path, press_server: PressSimulator, mosquitto: MosquittoBroker
) -> None:
    import httpx

    settings = settings_for(tmp_path, press_server, mosquitto)
    mosquitto.stop()
    async with running(settings) as agent:
        assert agent.http is not None
        async with httpx.AsyncClient(base_url=agent.http.url) as client:
            await wait_for(lambda: agent.sinks[0].status.state != "connected", timeout=10)
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            degraded = ready.json()["degraded"]
            assert any(entry.get("sink") == "cloud" for entry in degraded), degraded
            status = (await client.get("/status")).json()
            assert set(status["sources"]) == {"press7"}
            assert set(status["sinks"]) == {"cloud"}
            assert status["sinks"]["cloud"]["state"] in ("reconnecting", "disconnected", "starting")
            metrics = (await client.get("/metrics")).text
            for name in (
                'plantgate_buffer_depth_events{lane="transaction",sink="cloud"}',
                'plantgate_buffer_oldest_age_seconds{lane="transaction",sink="cloud"}',
                'plantgate_events_received_total{lane="telemetry",source="press7"}',
                'plantgate_events_delivered_total{lane="transaction",sink="cloud"}',
                "plantgate_dead_letters_total{",
            ):
                assert name in metrics, name
            # The OPC UA decoder in use is visible in /status and in the metrics alike.
            await wait_for(lambda: "decoder" in agent.sources[0].status.info, timeout=10)
            decoder = (await client.get("/status")).json()["sources"]["press7"]["info"]["decoder"]
            assert decoder in ("fast", "asyncua")
            metrics = (await client.get("/metrics")).text
            assert f'plantgate_component_info{{component="source",name="press7",path="{decoder}"}} 1.0' in metrics
            assert (await client.get("/healthz")).status_code == 200


async def test_telemetry_cap_evicts_oldest_and_reports_a_gap(
    tmp_path: Path, press_server: PressSimulator, mosquitto: MosquittoBroker
) -> None:
    text = write_config(tmp_path, press_server, mosquitto).read_text(encoding="utf-8")
    text = text.replace("[http]", "[buffer]\ntelemetry_max_rows = 10\n\n[http]")
    text = text.replace("deadband = 0.5", "deadband = 0.0")
    settings = parse_settings(text)
    mosquitto.stop()  # nothing leaves the buffer: telemetry piles up against its cap
    seen: list[CloudEvent] = []
    async with running(settings) as agent:
        agent.taps.append(seen.extend)
        for step in range(40):
            value = 50.0 + step
            await press_server.set_temperature(value)
            await wait_for(lambda v=value: agent.rules.current["press7.temperature"].value == v, timeout=5)
        await wait_for(lambda: any(e.type == "io.plantgate.telemetry.gap" for e in seen), timeout=15)
        assert agent.buffer.depth("cloud", "telemetry") <= 10 + 1
        assert agent.buffer.depth("cloud", "transaction") == 0
    gaps = [e for e in seen if e.type == "io.plantgate.telemetry.gap"]
    assert len(gaps) == 1, "at most one gap event per source per 10 s"
    gap = gaps[0]
    assert gap.lane == "operational"
    assert gap.data.source == "press7"
    assert gap.data.tags == ["press7.temperature"]
    assert gap.data.evicted_events >= 1
    assert gap.data.evicted_samples >= gap.data.evicted_events
    assert gap.data.start <= gap.data.end


async def test_status_heartbeat_carries_the_key_figures_retained(
    tmp_path: Path, press_server: PressSimulator, mosquitto: MosquittoBroker
) -> None:
    text = write_config(tmp_path, press_server, mosquitto).read_text(encoding="utf-8")
    settings = parse_settings(text + 'status_interval = "1s"\n')  # the last section is the MQTT sink
    topic = f"{PREFIX}/status/gw-e2e"
    async with running(settings):
        await cycles(press_server, ["WO-HB1"])
        with MqttCollector(mosquitto.host, mosquitto.port, topic) as collector:

            def heartbeats() -> list[dict[str, Any]]:
                return [msgspec.json.decode(m.payload) for m in collector.snapshot() if "figures" in m.payload.decode()]

            await wait_for(lambda: len(heartbeats()) >= 2, timeout=15, message="two heartbeats a second apart")
    first, second = heartbeats()[:2]
    assert first["state"] == "online" and first["agent"] == "gw-e2e" and first["site"] == "plant-e2e"
    assert second["time"] > first["time"]
    figures = second["figures"]
    assert figures["sources"] == {"press7": "connected"}
    cloud = figures["sinks"]["cloud"]
    assert cloud["state"] == "connected" and cloud["dead_letters"] == 0 and cloud["depth"] >= 0
    assert figures["refusing_writes"] is None and figures["headroom_bytes"] > 0
    # Retained: a monitor that subscribes later gets the latest heartbeat at once.
    with MqttCollector(mosquitto.host, mosquitto.port, topic) as late:
        await wait_for(lambda: bool(late.snapshot()), timeout=5)
        assert late.snapshot()[0].retain
