"""``plantgate demo``: the whole pipeline against built-in simulators, shown live.

Every source and sink the product has takes part, each against a real peer on
loopback: an OPC UA server simulating a press, a Modbus TCP server simulating a
filler, a scanner sending GS1 barcodes over TCP, an MES posting to the webhook
and serving a REST endpoint that the agent polls; the agent buffers in SQLite and
delivers to a JSON Lines file, to a local HTTP receiver through the HTTPS sink
and, when a broker answers on localhost:1883, to MQTT.
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
from protocols.barcode.simulator import ScannerSimulator
from protocols.https.receiver import DemoReceiver
from protocols.mes.simulator import MesSimulator
from protocols.modbus.simulator import FillerSimulator

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
ingest_token_file = "ingest-token"

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

[[sources.modbus]]
name = "filler2"
endpoint = "{filler_endpoint}"
poll_interval = "200ms"

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

[[sources.barcode]]
name = "dock1"
mode = "tcp-server"
listen = "127.0.0.1:{scanner_port}"
station = "receiving-dock-1"
event = "goods.received"
work_order_tag = "press7.work_order"
{mes_sources}
[[transactions]]
name = "filler2-output"
when = "filler2.cycle_done"
type = "production.completed"
fields = {{ work_order = "filler2.work_order", item = "filler2.item", quantity = "filler2.good_count" }}
uom = "pcs"
ack = "filler2.cycle_ack"

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

[[sinks.https]]
name = "erp-receiver"
url = "{receiver_url}"
lanes = ["transaction", "operational"]
batch_max = 500
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


class DemoSimulators:
    """The demo's peers, each real and on loopback: press (OPC UA), filler (Modbus TCP), scanner, MES, receiver."""

    def __init__(self, token: str) -> None:
        self.press = PressSimulator()
        self.filler = FillerSimulator()
        self.scanner_port = _free_port()
        self.scanner = ScannerSimulator(connect=f"127.0.0.1:{self.scanner_port}")
        self.mes = MesSimulator(token=token, serve_rest=True)
        self.receiver = DemoReceiver()
        self._stop = asyncio.Event()

    async def start(self) -> None:
        """Start every server (the scanner connects once the agent listens)."""
        await self.press.start()
        await self.filler.start()
        await self.mes.start()
        await self.receiver.start()

    def config(self, data_dir: Path, mqtt: bool) -> str:
        """The agent's TOML config for these simulators."""
        mes_sources = self.mes.webhook_config("mes") + self.mes.poll_config("mes-rest")
        return DEMO_CONFIG.format(
            data_dir=data_dir,
            endpoint=self.press.endpoint,
            filler_endpoint=self.filler.endpoint,
            scanner_port=self.scanner_port,
            mes_sources=mes_sources,
            receiver_url=self.receiver.url,
            mqtt=MQTT_SINK if mqtt else "",
        )

    def run(self, tasks: asyncio.TaskGroup, agent_url: str) -> None:
        """Start the simulated plant: cycles, scans, MES postings, until ``stop``."""
        self.mes.agent_url = agent_url
        tasks.create_task(self.press.run_demo(self._stop), name="press-simulator")
        tasks.create_task(self.filler.run_demo(self._stop), name="filler-simulator")
        tasks.create_task(self.scanner.run_demo(self._stop), name="scanner-simulator")
        tasks.create_task(self.mes.run_demo(self._stop), name="mes-simulator")

    def stop_running(self) -> None:
        """Ask the simulated plant to stop (the servers stay up until ``stop``)."""
        self._stop.set()

    async def stop(self) -> None:
        """Stop every server."""
        self._stop.set()
        for stop in (self.mes.stop, self.receiver.stop, self.filler.stop, self.press.stop):
            with contextlib.suppress(Exception):
                await stop()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def run_demo(*, seconds: float | None, data_dir: Path | None = None, simulators_only: bool = False) -> int:
    """Run the demo; returns the exit code."""
    import secrets
    import signal

    directory = data_dir or Path(tempfile.mkdtemp(prefix="plantgate-demo-"))
    directory.mkdir(parents=True, exist_ok=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)

    token = secrets.token_hex(16)
    token_file = directory / "ingest-token"
    token_file.write_text(token + "\n", encoding="utf-8")
    token_file.chmod(0o600)
    simulators = DemoSimulators(token)
    await simulators.start()
    try:
        mqtt = broker_answers()
        config_text = simulators.config(directory, mqtt)
        (directory / "plantgate.toml").write_text(config_text, encoding="utf-8")
        settings: Settings = parse_settings(config_text)
        agent = Agent(settings)
        view = LiveView(agent, tty=sys.stdout.isatty())
        print(f"plantgate demo: data in {directory}")
        print(f"  press (OPC UA) {simulators.press.endpoint}, filler (Modbus) {simulators.filler.endpoint}, "
              f"scanner -> 127.0.0.1:{simulators.scanner_port}, MES REST {simulators.mes.rest_url}, "
              f"receiver {simulators.receiver.url}")
        print("MQTT: broker on localhost:1883 found, publishing there too" if mqtt else
              "MQTT: no broker on localhost:1883 (start mosquitto to see the MQTT sink too)")
        started = time.monotonic()
        async with asyncio.TaskGroup() as tasks:
            agent_task = tasks.create_task(agent.run(stop), name="agent")
            await agent.wait_started()
            if agent.http is not None:
                print(f"status: {agent.http.url}/status   metrics: {agent.http.url}/metrics")
                simulators.run(tasks, agent.http.url)
            while not stop.is_set():
                elapsed = time.monotonic() - started
                view.show(elapsed)
                if seconds is not None and elapsed >= seconds:
                    stop.set()
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
            simulators.stop_running()
            await agent_task
    finally:
        await simulators.stop()
    view.show(time.monotonic() - started)
    _where_it_went(agent, directory, mqtt, view, simulators.receiver)
    return 0


def _where_it_went(agent: Agent, directory: Path, mqtt: bool, view: LiveView, receiver: DemoReceiver) -> None:
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
    print(f"  the local receiver got {receiver.events} events in {receiver.batches} batches")
    config = directory / "plantgate.toml"
    # The command as it can be run from here: the venv's own plantgate, which may not be on PATH.
    plantgate = Path(sys.executable).parent / "plantgate"
    command = str(plantgate) if plantgate.exists() else "plantgate"
    print(f"  buffer: {directory / 'buffer.db'} (dead letters: {agent.buffer.dead_letter_count})")
    print(f"  inspect: {command} buffer stats -c {config}")
    print(f"           {command} buffer dead-letters -c {config}")
    if not mqtt:
        print("  (no MQTT broker was running on localhost:1883)")
