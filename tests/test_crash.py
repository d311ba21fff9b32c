"""Crash test: ``kill -9`` of the agent, again and again, under load, with the broker coming and going.

The agent runs as a child process (``plantgate run``) on one data dir; the press
is a real asyncua server in this process completing cycles with the PLC handshake
(a new work order per cycle); the broker is a real mosquitto with persistence
that the test stops and starts. A subscriber with a persistent session (QoS 1)
records what the broker delivers. At the end, with the broker up, the last agent
drains its buffer; then:

- every cycle whose handshake was acknowledged reached the subscriber
  ("nothing acknowledged is ever lost");
- every fact (work order) arrived under one id only; repeats carry that id.

The kill moments come from a fixed seed; the whole test is bounded in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.simulator import PressSimulator
from tests.peers.mosquitto import MosquittoBroker, MqttCollector, free_port
from tests.peers.waiting import wait_for

PREFIX = "plantgate/plant-crash"
COMPLETED = f"{PREFIX}/transaction/production.completed"
KILLS = 20
SEED = 20261204

CONFIG = """
[agent]
site = "plant-crash"
id = "gw-crash"
data_dir = "{data_dir}"

[http]
listen = "127.0.0.1:{http_port}"

[[sources.opcua]]
name = "press7"
endpoint = "{endpoint}"
publishing_interval = "50ms"
reconnect_max_backoff = "500ms"

  [[sources.opcua.tags]]
  tag = "press7.temperature"
  node = "ns=2;s=Press7.Temperature"
  kind = "telemetry"
  deadband = 0.0

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
uom = "EA"
ack = "press7.cycle_ack"

[[sinks.mqtt]]
name = "cloud"
url = "{mqtt_url}"
topic_prefix = "{prefix}"
reconnect_max_backoff = "500ms"
"""


class PressLine:
    """The press running: a cycle after another (each its own work order), temperature moving in between."""

    def __init__(self, press: PressSimulator, seed: int):
        self.press = press
        self.rng = random.Random(seed)
        self.cycles = 0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._cycles())
            tasks.create_task(self._temperature())

    async def _cycles(self) -> None:
        while not self.stop.is_set():
            self.cycles += 1
            # Waits for the ack (at most 2 s), then resets CycleAck and CycleDone as a PLC does.
            await self.press.complete_cycle(f"WO-{self.cycles:05d}", "FILL-500", self.cycles, wait_ack=2.0)
            # The reset must reach the agent before the next cycle rises (publishing interval 50 ms).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.15)

    async def _temperature(self) -> None:
        value = 180.0
        while not self.stop.is_set():
            value += self.rng.uniform(-2, 2)
            await self.press.set_temperature(round(value, 2))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.02)


def status_of(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as response:
            body: dict[str, Any] = json.loads(response.read())
            return body
    except OSError:
        return None


@pytest.mark.timeout(240)
async def test_kill_9_under_load_loses_no_acknowledged_cycle(
    tmp_path: Path, press_server: PressSimulator, mosquitto_factory: Callable[..., MosquittoBroker]
) -> None:
    started_at = time.monotonic()
    rng = random.Random(SEED)
    broker = mosquitto_factory(persistence=True)
    collector = MqttCollector(broker.host, broker.port, COMPLETED, client_id="crash-subscriber", clean_session=False)
    collector.start()
    http_port = free_port()
    config = tmp_path / "plantgate.toml"
    config.write_text(
        CONFIG.format(
            data_dir=tmp_path / "data",
            http_port=http_port,
            endpoint=press_server.endpoint,
            mqtt_url=broker.url,
            prefix=PREFIX,
        ),
        encoding="utf-8",
    )
    command = [str(Path(sys.executable).parent / "plantgate"), "run", "-c", str(config)]
    log_path = tmp_path / "agent.log"
    line = PressLine(press_server, SEED)
    running_line = asyncio.create_task(line.run())
    kills = 0
    broker_outages = 0
    lives_with_acks = 0  # agent lives in which the PLC got at least one ack
    try:
        with log_path.open("ab") as agent_log:
            for kills in range(1, KILLS + 1):  # noqa: B007 - the count is reported after the loop
                acked_before = len(press_server.acknowledged)
                agent = await asyncio.create_subprocess_exec(*command, stdout=agent_log, stderr=agent_log)
                try:
                    # The fault schedule (not a synchronisation): a random moment of the agent's life,
                    # from before its first commit to a few handshakes in.
                    await asyncio.sleep(rng.uniform(0.3, 4.0))
                    if rng.random() < 0.3:
                        if broker.running:
                            broker.stop()
                            broker_outages += 1
                        else:
                            broker.start()
                finally:
                    agent.send_signal(signal.SIGKILL)
                    await asyncio.wait_for(agent.wait(), 10)
                assert agent.returncode == -signal.SIGKILL, f"agent exited on its own ({agent.returncode})"
                lives_with_acks += len(press_server.acknowledged) > acked_before
            if not broker.running:
                broker.start()
            # The last agent: it runs on, the line stops, the buffer drains to the broker.
            agent = await asyncio.create_subprocess_exec(*command, stdout=agent_log, stderr=agent_log)
            try:
                await wait_for(lambda: status_of(http_port) is not None, timeout=20)
                await wait_for(lambda: len(press_server.acknowledged) > 0, timeout=20)
                line.stop.set()
                await asyncio.wait_for(running_line, 10)
                acknowledged = {cycle[0] for cycle in press_server.acknowledged}

                def delivered() -> set[str]:
                    return {json.loads(m.payload)["subject"] for m in collector.snapshot() if m.topic == COMPLETED}

                def drained() -> bool:
                    status = status_of(http_port)
                    return status is not None and status["sinks"]["cloud"]["depth"] == 0 and acknowledged <= delivered()

                await wait_for(
                    drained,
                    timeout=60,
                    interval=0.2,
                    message=lambda: f"missing {sorted(acknowledged - delivered())[:20]}; status {status_of(http_port)}",
                )
            finally:
                agent.send_signal(signal.SIGTERM)
                returncode = await asyncio.wait_for(agent.wait(), 30)
            assert returncode == 0, "SIGTERM drains and exits 0"
    finally:
        line.stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running_line, 10)
        collector.stop()

    events = [json.loads(m.payload) for m in collector.snapshot() if m.topic == COMPLETED]
    ids_of: dict[str, set[str]] = defaultdict(set)
    for event in events:
        ids_of[event["subject"]].add(event["id"])
    lost = acknowledged - set(ids_of)
    assert not lost, f"acknowledged cycles never delivered: {sorted(lost)}"
    under_two_ids = {subject: ids for subject, ids in ids_of.items() if len(ids) > 1}
    assert not under_two_ids, f"facts delivered under more than one id: {under_two_ids}"
    for event in events:  # each fact is the cycle the press completed, fields intact
        assert event["data"]["work_order"] == event["subject"]
        assert event["data"]["quantity"]["value"] == str(int(event["subject"].removeprefix("WO-")))
    duplicates = len(events) - len(ids_of)
    elapsed = time.monotonic() - started_at
    print(
        f"crash test: {kills} kills, {broker_outages} broker outages, {line.cycles} cycles, "
        f"{len(acknowledged)} acknowledged, {len(ids_of)} delivered, {duplicates} duplicates (same id), "
        f"{lives_with_acks} of {KILLS} killed agents had acknowledged cycles, {elapsed:.0f} s"
    )
    assert kills == KILLS
    # The handshake comes back after restarts: the restarted agent hears the press again.
    assert lives_with_acks >= KILLS // 4, (
        f"the PLC handshake did not come back after restarts: {lives_with_acks} of {KILLS} lives had acks"
    )
