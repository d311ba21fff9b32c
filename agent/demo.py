"""``plantgate demo``: the whole pipeline against built-in simulators, shown live.

A real OPC UA server simulating a press runs on loopback; the agent subscribes
to it, classifies, buffers in SQLite and delivers to a JSON Lines file and, when
a broker answers on localhost:1883, to MQTT. Every source and sink the product
has takes part here.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Sequence
from pathlib import Path

from agent.events import CloudEvent
from agent.pipeline import Agent
from agent.settings import Settings, parse_settings
from agent.simulator import PressSimulator

DEMO_CONFIG = """
[agent]
site = "demo-plant"
id = "demo-gw"
data_dir = "{data_dir}"
log_level = "WARNING"

[buffer]
path = "buffer.db"

[http]
listen = "127.0.0.1:0"

[[sources.opcua]]
name = "press7"
endpoint = "{endpoint}"
publishing_interval = "100ms"

  [[sources.opcua.tags]]
  tag = "press7.temperature"
  node = "ns=2;s=Press7.Temperature"
  kind = "telemetry"
  deadband = 0.5

  [[sources.opcua.tags]]
  tag = "press7.state"
  node = "ns=2;s=Press7.State"
  kind = "state"
  states = {{ 0 = "stopped", 1 = "running", 2 = "fault" }}

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
"P-100-OLD" = {{ obsolete = true }}
"FILL-500" = "40012345000017"

[mappings.uom]
"pcs" = "EA"

[[sinks.jsonl]]
name = "demo-file"
path = "events.jsonl"
{mqtt}
"""

MQTT_SINK = """
[[sinks.mqtt]]
name = "local-broker"
url = "mqtt://127.0.0.1:1883"
topic_prefix = "plantgate/demo-plant"
"""


def broker_answers(host: str = "127.0.0.1", port: int = 1883, timeout: float = 0.3) -> bool:
    """Whether something accepts TCP connections on the usual MQTT port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class LiveView:
    """Counts per lane and type and the last events, redrawn once a second."""

    def __init__(self, agent: Agent, *, tty: bool):
        self.agent = agent
        self.tty = tty
        self.by_lane: Counter[str] = Counter()
        self.by_type: Counter[str] = Counter()
        self.last: deque[CloudEvent] = deque(maxlen=6)
        agent.taps.append(self.tap)

    def tap(self, events: Sequence[CloudEvent]) -> None:
        for event in events:
            self.by_lane[event.lane] += 1
            self.by_type[event.type.removeprefix("io.plantgate.")] += 1
            if event.lane != "telemetry":
                self.last.append(event)

    def render(self, elapsed: float) -> str:
        agent = self.agent
        lines = [f"plantgate demo  {elapsed:5.1f}s   site demo-plant, agent demo-gw   (Ctrl-C stops)"]
        for source in agent.sources:
            lines.append(f"  source {source.name:<14} {source.status.state}")
        lines.append("  events in:   " + "   ".join(f"{lane} {self.by_lane[lane]}" for lane in _LANES))
        lines.append("  by type:     " + ", ".join(f"{name} {n}" for name, n in sorted(self.by_type.items())))
        for sink in agent.sinks:
            depth = sum(agent.buffer.depth(sink.name, lane) for lane in sink.lanes)
            lines.append(f"  sink {sink.name:<16} {sink.status.state:<13} buffered {depth}")
        lines.append(f"  dead letters: {agent.buffer.dead_letter_count}")
        lines.append("  last business events:")
        for event in list(self.last)[::-1]:
            lines.append(f"    {event.time:%H:%M:%S} {event.type.removeprefix('io.plantgate.'):<24} {_brief(event)}")
        return "\n".join(lines)

    def show(self, elapsed: float) -> None:
        text = self.render(elapsed)
        if self.tty:
            sys.stdout.write("\x1b[H\x1b[J" + text + "\n")
        else:
            by_lane = " ".join(f"{lane}={self.by_lane[lane]}" for lane in _LANES)
            sys.stdout.write(f"[{elapsed:5.1f}s] {by_lane} dead_letters={self.agent.buffer.dead_letter_count}\n")
        sys.stdout.flush()


_LANES = ("transaction", "operational", "telemetry")


def _brief(event: CloudEvent) -> str:
    data = event.data
    if isinstance(data, dict):
        parts = []
        for key, value in data.items():
            shown = f"{value.value} {value.uom}" if hasattr(value, "uom") else value
            parts.append(f"{key}={shown}")
        return " ".join(parts)
    state = getattr(data, "state", None)
    if state is not None:
        return f"{getattr(data, 'tag', '')} {getattr(data, 'previous', None) or '(start)'} -> {state}"
    return event.subject or ""


async def run_demo(*, seconds: float | None, data_dir: Path | None = None) -> int:
    """Run the demo; returns the exit code."""
    directory = data_dir or Path(tempfile.mkdtemp(prefix="plantgate-demo-"))
    directory.mkdir(parents=True, exist_ok=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)

    press = PressSimulator()
    await press.start()
    mqtt = broker_answers()
    config_text = DEMO_CONFIG.format(data_dir=directory, endpoint=press.endpoint, mqtt=MQTT_SINK if mqtt else "")
    (directory / "plantgate.toml").write_text(config_text, encoding="utf-8")
    settings: Settings = parse_settings(config_text)
    agent = Agent(settings)
    view = LiveView(agent, tty=sys.stdout.isatty())
    print(f"plantgate demo: press simulator at {press.endpoint}; data in {directory}")
    print("MQTT: broker on localhost:1883 found, publishing there too" if mqtt else
          "MQTT: no broker on localhost:1883 (start mosquitto to see the MQTT sink too); JSON Lines only")
    started = time.monotonic()
    press_stop = asyncio.Event()
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(press.run_demo(press_stop), name="press-simulator")
        agent_task = tasks.create_task(agent.run(stop), name="agent")
        await agent.wait_started()
        if agent.http is not None:
            print(f"status: {agent.http.url}/status   metrics: {agent.http.url}/metrics")
        while not stop.is_set():
            elapsed = time.monotonic() - started
            view.show(elapsed)
            if seconds is not None and elapsed >= seconds:
                stop.set()
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
        await agent_task
        press_stop.set()
    await press.stop()
    view.show(time.monotonic() - started)
    _where_it_went(agent, directory, mqtt, view)
    return 0


def _where_it_went(agent: Agent, directory: Path, mqtt: bool, view: LiveView) -> None:
    total = sum(view.by_lane.values())
    print(f"\n{total} events made; where they went:")
    configs = {config.name: config for config in agent.settings.sink_configs()}
    for sink in agent.sinks:
        delivered = agent.delivered[sink.name]
        left = sum(agent.buffer.depth(sink.name, lane) for lane in sink.lanes)
        path = getattr(sink, "path", None)
        url = getattr(configs[sink.name], "url", None)
        where = f"appended to {path}" if path is not None else f"sent to {url}"
        print(f"  {sink.name}: {delivered} events {where}; {left} still buffered for it")
    config = directory / "plantgate.toml"
    print(f"  buffer: {directory / 'buffer.db'} (dead letters: {agent.buffer.dead_letter_count})")
    print(f"  inspect: plantgate buffer stats -c {config}; plantgate buffer dead-letters -c {config}")
    if not mqtt:
        print("  (no MQTT broker was running on localhost:1883)")
