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
listen = "{listen}"
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
poll_interval = "500ms"
timeout = "400ms"

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
{scanner_address}
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


HOST = "127.0.0.1"

WELL_KNOWN_PORTS = {"agent": 9480, "press": 4840, "filler": 5020, "scanner": 9004, "mes": 8081, "receiver": 8088}
"""``--simulators-only``: the loopback ports used when free (the agent's is the one its config listens on)."""

REJECT_EVERY = 10
"""The demo ERP rejects every this many-th production confirmation ("posting period closed")."""


class Ports:
    """Where each simulator (and the agent) listens; ``fallbacks`` names those that could not get their port."""

    def __init__(self, ports: dict[str, int], fallbacks: Sequence[str] = ()) -> None:
        self.agent = ports["agent"]
        self.press = ports["press"]
        self.filler = ports["filler"]
        self.scanner = ports["scanner"]
        self.mes = ports["mes"]
        self.receiver = ports["receiver"]
        self.fallbacks = list(fallbacks)

    @classmethod
    def free(cls) -> Ports:
        """Ports the kernel hands out (the demo: nothing to remember, nothing to collide with)."""
        return cls({name: _free_port() for name in WELL_KNOWN_PORTS})

    @classmethod
    def well_known(cls) -> Ports:
        """``WELL_KNOWN_PORTS`` where free, else a free port (named in ``fallbacks``)."""
        ports, fallbacks = {}, []
        for name, port in WELL_KNOWN_PORTS.items():
            if _port_is_free(port):
                ports[name] = port
            else:
                ports[name] = _free_port()
                fallbacks.append(name)
        return cls(ports, fallbacks)

    @property
    def agent_url(self) -> str:
        return f"http://{HOST}:{self.agent}"


class LiveView:
    """Counts per lane and type and the last events, redrawn once a second."""

    def __init__(self, agent: Agent, receiver: DemoReceiver, console_url: str, *, tty: bool):
        self.agent = agent
        self.receiver = receiver
        self.console_url = console_url
        self.tty = tty
        self.by_lane: Counter[str] = Counter()
        self.by_type: Counter[str] = Counter()
        self.last: deque[CloudEvent] = deque(maxlen=6)
        self._shown = 0
        agent.taps.append(self.tap)

    def tap(self, events: Sequence[CloudEvent]) -> None:
        for event in events:
            self.by_lane[event.lane] += 1
            self.by_type[event.type.removeprefix("io.plantgate.")] += 1
            if event.lane != "telemetry":
                self.last.append(event)

    def render(self, elapsed: float) -> str:
        agent = self.agent
        lines = [
            f"plantgate demo  {elapsed:5.1f}s   console {self.console_url}   (Ctrl-C stops)",
            "  site demo-plant, agent demo-gw",
        ]
        for source in agent.sources:
            lines.append(f"  source {source.name:<14} {source.status.state}")
        lines.append("  events in:   " + "   ".join(f"{lane} {self.by_lane[lane]}" for lane in _LANES))
        lines.append("  by type:     " + ", ".join(f"{name} {n}" for name, n in sorted(self.by_type.items())))
        for sink in agent.sinks:
            depth = sum(agent.buffer.depth(sink.name, lane) for lane in sink.lanes)
            lines.append(f"  sink {sink.name:<16} {sink.status.state:<13} buffered {depth}")
        lines.append(f"  dead letters: {agent.buffer.dead_letter_count}")
        lines.append(f"  ERP: {_erp_counts(self.receiver)}")
        lines.append("  last business events:")
        for event in list(self.last)[::-1]:
            lines.append(f"    {event.time:%H:%M:%S} {event.type.removeprefix('io.plantgate.'):<24} {_brief(event)}")
        return "\n".join(lines)

    def show(self, elapsed: float) -> None:
        if self.tty:
            sys.stdout.write("\x1b[H\x1b[J" + self.render(elapsed) + "\n")
        else:
            by_lane = " ".join(f"{lane}={self.by_lane[lane]}" for lane in _LANES)
            receiver = self.receiver
            sys.stdout.write(
                f"[{elapsed:5.1f}s] {by_lane} dead_letters={self.agent.buffer.dead_letter_count} "
                f"erp_posted={receiver.posted} erp_rejected={receiver.rejected}\n"
            )
            # A log scrolls: the console's address comes round again every ten lines.
            self._shown += 1
            if self._shown % 10 == 0:
                sys.stdout.write(f"[{elapsed:5.1f}s] console: {self.console_url}\n")
        sys.stdout.flush()


_LANES = ("transaction", "operational", "telemetry")


def _erp_counts(receiver: DemoReceiver) -> str:
    """The middleware's side in one line: what the ERP did, and whether the agent took the reports."""
    text = f"posted {receiver.posted}, rejected {receiver.rejected}"
    if receiver.outcomes_not_supported:
        text += f" (this agent has no /v1/outcomes yet: {receiver.outcomes_not_supported} reports not taken)"
    elif receiver.outcomes_recorded or receiver.outcomes_unknown:
        text += f" (reported to the agent: {receiver.outcomes_recorded} recorded"
        text += f", {receiver.outcomes_unknown} unknown)" if receiver.outcomes_unknown else ")"
    if receiver.pending_outcomes and receiver.outcomes_failed:
        text += f"; {receiver.pending_outcomes} reports wait for the agent"
    return text


def _brief(event: CloudEvent) -> str:
    data = event.data
    if isinstance(data, dict):
        parts = []
        for key, value in data.items():
            if hasattr(value, "uom"):
                shown = f"{value.value} {value.uom}"
            elif isinstance(value, dict) and value.keys() == {"value", "uom"}:  # a quantity from the MES
                shown = f"{value['value']} {value['uom']}"
            else:
                shown = value
            parts.append(f"{key}={shown}")
        return " ".join(parts)
    state = getattr(data, "state", None)
    if state is not None:
        return f"{getattr(data, 'tag', '')} {getattr(data, 'previous', None) or '(start)'} -> {state}"
    return event.subject or ""


class DemoSimulators:
    """The demo's peers, each real and on loopback: press (OPC UA), filler (Modbus TCP), scanner, MES, receiver.

    With ``scanner_listens`` the scanner waits for an agent to connect (a ``tcp-client``
    barcode source); otherwise it connects to the agent's ``tcp-server`` source on
    ``ports.scanner``. The receiver acts as the ERP's middleware and reports outcomes
    to the agent on ``ports.agent`` with ``token``.
    """

    def __init__(self, token: str, ports: Ports, *, scanner_listens: bool = False) -> None:
        self.ports = ports
        self.scanner_listens = scanner_listens
        self.press = PressSimulator(host=HOST, port=ports.press)
        self.filler = FillerSimulator(host=HOST, port=ports.filler)
        if scanner_listens:
            self.scanner = ScannerSimulator(host=HOST, port=ports.scanner)
        else:
            self.scanner = ScannerSimulator(connect=f"{HOST}:{ports.scanner}")
        self.mes = MesSimulator(token=token, serve_rest=True, host=HOST, port=ports.mes)
        self.receiver = DemoReceiver(
            HOST, ports.receiver, middleware=True, agent_url=ports.agent_url, token=token, reject_every=REJECT_EVERY
        )
        self._stop = asyncio.Event()

    async def start(self) -> None:
        """Start every server (a connecting scanner connects once the agent listens)."""
        await self.press.start()
        await self.filler.start()
        await self.mes.start()
        await self.receiver.start()
        if self.scanner_listens:
            await self.scanner.start()

    def config(self, data_dir: Path, mqtt: bool) -> str:
        """The agent's TOML config for these simulators."""
        mes_sources = self.mes.webhook_config("mes") + self.mes.poll_config("mes-rest")
        if self.scanner_listens:
            scanner = f'mode = "tcp-client"\nconnect = "{HOST}:{self.ports.scanner}"'
        else:
            scanner = f'mode = "tcp-server"\nlisten = "{HOST}:{self.ports.scanner}"'
        return DEMO_CONFIG.format(
            data_dir=data_dir,
            listen=f"{HOST}:{self.ports.agent}",
            endpoint=self.press.endpoint,
            filler_endpoint=self.filler.endpoint,
            scanner_address=scanner,
            mes_sources=mes_sources,
            receiver_url=self.receiver.url,
            mqtt=MQTT_SINK if mqtt else "",
        )

    def run(self, tasks: asyncio.TaskGroup, agent_url: str | None) -> None:
        """Start the simulated plant: cycles, scans, MES postings, until ``stop_running``.

        The MES posts to ``agent_url`` (None: not yet; set ``mes.agent_url`` later).
        """
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
        for stop in (self.mes.stop, self.receiver.stop, self.scanner.stop, self.filler.stop, self.press.stop):
            with contextlib.suppress(Exception):
                await stop()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
    return port


def _port_is_free(port: int) -> bool:
    # The servers set SO_REUSEADDR too: a port held only by closed connections is free for them.
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def _plantgate_command() -> str:
    # The command as it can be run from here: the venv's own plantgate, which may not be on PATH.
    plantgate = Path(sys.executable).parent / "plantgate"
    return str(plantgate) if plantgate.exists() else "plantgate"


def _write_token(directory: Path) -> str:
    import secrets

    token = secrets.token_hex(16)
    token_file = directory / "ingest-token"
    token_file.write_text(token + "\n", encoding="utf-8")
    token_file.chmod(0o600)
    return token


async def run_demo(*, seconds: float | None, data_dir: Path | None = None, simulators_only: bool = False) -> int:
    """Run the demo (or, with ``simulators_only``, the simulators alone); returns the exit code."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    if simulators_only:
        directory = data_dir or Path(tempfile.mkdtemp(prefix="plantgate-simulators-"))
        directory.mkdir(parents=True, exist_ok=True)
        return await run_simulators(directory, seconds=seconds, stop=stop)
    # The agent's port is chosen before anything else, so its console is the first thing shown.
    ports = Ports.free()
    console_url = f"{ports.agent_url}/"
    print(f"plantgate demo: console {console_url}  (open it in a browser; Ctrl-C stops the demo)", flush=True)
    directory = data_dir or Path(tempfile.mkdtemp(prefix="plantgate-demo-"))
    directory.mkdir(parents=True, exist_ok=True)
    token = _write_token(directory)
    simulators = DemoSimulators(token, ports)
    await simulators.start()
    try:
        mqtt = broker_answers()
        config_text = simulators.config(directory, mqtt)
        config_path = directory / "plantgate.toml"
        config_path.write_text(config_text, encoding="utf-8")
        settings: Settings = parse_settings(config_text)
        agent = Agent(settings, config_path=config_path)
        view = LiveView(agent, simulators.receiver, console_url, tty=sys.stdout.isatty())
        print(f"data in {directory}")
        print(f"  press (OPC UA) {simulators.press.endpoint}, filler (Modbus) {simulators.filler.endpoint}, "
              f"scanner -> {HOST}:{ports.scanner}, MES REST {simulators.mes.rest_url}, "
              f"ERP middleware (receiver) {simulators.receiver.url}")
        print("MQTT: broker on localhost:1883 found, publishing there too" if mqtt else
              "MQTT: no broker on localhost:1883 (start mosquitto to see the MQTT sink too)")
        started = time.monotonic()
        agent_stop = asyncio.Event()
        async with asyncio.TaskGroup() as tasks:
            agent_task = tasks.create_task(agent.run(agent_stop), name="agent")
            await agent.wait_started()
            if agent.http is not None:
                print(f"status: {agent.http.url}/status   metrics: {agent.http.url}/metrics")
                simulators.run(tasks, agent.http.url)
            while not stop.is_set() and not agent_task.done():
                elapsed = time.monotonic() - started
                view.show(elapsed)
                if seconds is not None and elapsed >= seconds:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
            simulators.stop_running()
            # The ERP's last verdicts reach the agent before it stops.
            await simulators.receiver.flush_outcomes()
            agent_stop.set()
            await agent_task
    finally:
        await simulators.stop()
    view.show(time.monotonic() - started)
    _where_it_went(agent, directory, mqtt, view, simulators.receiver, console_url)
    return 0


def _where_it_went(
    agent: Agent, directory: Path, mqtt: bool, view: LiveView, receiver: DemoReceiver, console_url: str
) -> None:
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
    print(f"  the ERP behind it: {_erp_counts(receiver)}")
    config = directory / "plantgate.toml"
    command = _plantgate_command()
    print(f"  buffer: {directory / 'buffer.db'} (dead letters: {agent.buffer.dead_letter_count})")
    print(f"  inspect: {command} buffer stats -c {config}")
    print(f"           {command} buffer dead-letters -c {config}")
    work_order = _work_order_to_trace(receiver)
    if work_order is not None:
        print(f"  trace:   {command} trace {work_order} -c {config}")
    print(f"  console: {console_url} (closed with the demo; to open it again on this data:)")
    print(f"           {command} run -c {config}")
    if not mqtt:
        print("  (no MQTT broker was running on localhost:1883)")


def _work_order_to_trace(receiver: DemoReceiver) -> str | None:
    """A work order worth tracing: one with a rejected posting, else the latest posted production."""
    decisions = list(receiver.decisions)
    for decision in reversed(decisions):
        if decision.outcome == "rejected" and decision.work_order:
            return decision.work_order
    for decision in reversed(decisions):
        if decision.type.endswith(".production.completed") and decision.work_order:
            return decision.work_order
    return next((d.work_order for d in reversed(decisions) if d.work_order), None)


# --- the simulators alone -----------------------------------------------------------------------------

SIMULATORS_HEADER = """\
# Written by `plantgate demo --simulators-only`: an agent config for the built-in simulators.
# Try it while they run:  plantgate check -c {path}
#                         plantgate run -c {path}
# The MES simulator posts to [http].listen below with the token in ingest-token; the
# receiver (the HTTPS sink's target) reports the ERP's outcomes there too.
"""


def simulator_offers(simulators: DemoSimulators) -> list[str]:
    """What each simulator offers, as lines for people: endpoint, then its tags or registers."""
    ports = simulators.ports
    press = PressSimulator.node_id
    return [
        f"press (OPC UA server)   {simulators.press.endpoint}   anonymous, security None",
        f"    {press('Temperature')} Double, {press('State')} Int32 (0 stopped, 1 running, 2 fault),",
        f"    {press('CycleDone')} Boolean, {press('CycleAck')} Boolean (written by the agent),",
        f"    {press('WorkOrder')} String, {press('Item')} String, {press('BatchQty')} Double",
        f"filler (Modbus TCP)     {simulators.filler.endpoint}   unit 1",
        "    holding:0 uint32 good count, holding:2 state (0 stopped, 1 running, 2 fault), holding:4 float32 fill",
        "    weight, holding:10 uint32 work order, holding:12 quantity, holding:20 string:8 item,",
        "    coil:0 cycle done, coil:1 cycle ack (written by the agent)",
        f"scanner (TCP)           {HOST}:{ports.scanner}   connect to it: mode = \"tcp-client\"; GS1-128, GS1",
        "    DataMatrix and QR codes, a plain Code 128, a double read, now and then a garbled read; CR-terminated",
        f"MES REST                {simulators.mes.rest_url}   GET ?since=<id>: {{records, next}}, ETag",
        f"MES webhook             posts to {ports.agent_url}/v1/events (CloudEvents) and /v1/mes/confirmations",
        "    with the token in ingest-token, while an agent answers there",
        f"receiver (HTTPS sink)   {simulators.receiver.url}   answers with references (ERP-<n>);",
        f"    reports the ERP's outcomes to {ports.agent_url}/v1/outcomes (posted DOC-<n>; rejected:",
        f"    every {REJECT_EVERY}th production.completed, \"posting period closed\")",
    ]


async def run_simulators(directory: Path, *, seconds: float | None, stop: asyncio.Event) -> int:
    """Run the built-in simulators alone on their well-known ports, for an agent the user runs."""
    token = _write_token(directory)
    ports = Ports.well_known()
    simulators = DemoSimulators(token, ports, scanner_listens=True)
    await simulators.start()
    try:
        config_path = directory / "simulators.toml"
        config_text = SIMULATORS_HEADER.format(path=config_path) + simulators.config(directory, mqtt=False)
        parse_settings(config_text)  # what is written is a valid config
        config_path.write_text(config_text, encoding="utf-8")
        command = _plantgate_command()
        print("plantgate simulators (no agent in this process; Ctrl-C stops them)")
        for line in simulator_offers(simulators):
            print("  " + line)
        if ports.fallbacks:
            taken = ", ".join(f"{name} {WELL_KNOWN_PORTS[name]}" for name in ports.fallbacks)
            print(f"  (ports in use: {taken}; free ports were taken instead, as shown)")
        print(f"config for them: {config_path}")
        print(f"  try: {command} check -c {config_path}")
        print(f"       {command} run -c {config_path}")
        print(f"  then: console {ports.agent_url}/, events in {directory / 'events.jsonl'}", flush=True)
        started = time.monotonic()
        async with asyncio.TaskGroup() as tasks:
            simulators.run(tasks, None)
            watcher = tasks.create_task(_follow_agent(simulators, started), name="agent-watcher")
            shown = 0
            while not stop.is_set():
                elapsed = time.monotonic() - started
                if seconds is not None and elapsed >= seconds:
                    break
                if elapsed >= (shown + 1) * 10:
                    shown += 1
                    print(f"[{elapsed:5.0f}s] {_simulator_counts(simulators)}", flush=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
            watcher.cancel()
            simulators.stop_running()
    finally:
        await simulators.stop()
    print(f"simulators stopped: {_simulator_counts(simulators)}")
    return 0


def _simulator_counts(simulators: DemoSimulators) -> str:
    receiver = simulators.receiver
    return (
        f"press cycles acknowledged {len(simulators.press.acknowledged)}, "
        f"filler cycles acknowledged {len(simulators.filler.acknowledged)}, scans sent {simulators.scanner.sent}, "
        f"MES events accepted {simulators.mes.sent}, receiver got {receiver.events} events; "
        f"ERP {_erp_counts(receiver)}"
    )


async def _follow_agent(simulators: DemoSimulators, started: float) -> None:
    """Point the MES at the agent while one answers on the config's listen address, and say when that changes."""
    import httpx

    url = simulators.ports.agent_url
    async with httpx.AsyncClient(timeout=1.0) as client:
        while True:
            try:
                answers = (await client.get(url + "/healthz")).status_code == 200
            except httpx.HTTPError:
                answers = False
            if answers != (simulators.mes.agent_url is not None):
                simulators.mes.agent_url = url if answers else None
                elapsed = time.monotonic() - started
                what = "an agent answers: the MES posts to it" if answers else "the agent is gone: the MES waits"
                print(f"[{elapsed:5.0f}s] {url}: {what}", flush=True)
            await asyncio.sleep(1.0 if not answers else 2.0)
