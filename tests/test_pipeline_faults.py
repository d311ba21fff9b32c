"""Faults inside the pipeline: a full disk, a crashing component, an unreachable PLC.

Everything is real: the press is an asyncua server, the buffer sits on a tmpfs
that really fills up, sinks write real files. The agent runs in this event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.backoff import Backoff
from agent.events import LANES, Lane
from agent.health import ComponentStatus
from agent.pipeline import Agent
from agent.plc_acks import PlcAckWriter
from agent.rules import PlcAck
from agent.settings import Settings, parse_settings
from agent.simulator import PressSimulator
from agent.sink import ACKED, BufferedEvent, Outcome
from agent.supervision import TaskHealth, supervise
from buffer import BufferError
from tests.peers.opcua_server import started_press
from tests.peers.waiting import wait_for

PRESS_TAGS = """
  [[sources.opcua.tags]]
  tag = "{p}.temperature"
  node = "ns=2;s=Press7.Temperature"
  kind = "telemetry"
  deadband = 0.0

  [[sources.opcua.tags]]
  tag = "{p}.cycle_done"
  node = "ns=2;s=Press7.CycleDone"
  kind = "value"

  [[sources.opcua.tags]]
  tag = "{p}.cycle_ack"
  node = "ns=2;s=Press7.CycleAck"
  kind = "value"

  [[sources.opcua.tags]]
  tag = "{p}.work_order"
  node = "ns=2;s=Press7.WorkOrder"
  kind = "value"

  [[sources.opcua.tags]]
  tag = "{p}.item"
  node = "ns=2;s=Press7.Item"
  kind = "value"

  [[sources.opcua.tags]]
  tag = "{p}.batch_qty"
  node = "ns=2;s=Press7.BatchQty"
  kind = "value"

[[transactions]]
name = "{p}-completion"
when = "{p}.cycle_done"
type = "production.completed"
fields = {{ work_order = "{p}.work_order", item = "{p}.item", quantity = "{p}.batch_qty" }}
uom = "EA"
ack = "{p}.cycle_ack"
"""


def press_source(name: str, endpoint: str, options: str = "") -> str:
    return f"""
[[sources.opcua]]
name = "{name}"
endpoint = "{endpoint}"
publishing_interval = "50ms"
reconnect_max_backoff = "500ms"
{options}
""" + PRESS_TAGS.format(p=name)


def agent_config(
    data_dir: Path, presses: dict[str, str], events_file: Path, extra: str = "", source_options: str = ""
) -> Settings:
    text = f"""
[agent]
site = "plant-faults"
id = "gw-faults"
data_dir = "{data_dir}"

[http]
listen = "127.0.0.1:0"
{extra}
[[sinks.jsonl]]
name = "file"
path = "{events_file}"
"""
    text += "".join(press_source(name, endpoint, source_options) for name, endpoint in presses.items())
    return parse_settings(text)


@contextlib.asynccontextmanager
async def running(agent: Agent, *, connected: tuple[str, ...] = ()) -> AsyncIterator[Agent]:
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop), name="agent-under-test")
    try:
        await asyncio.wait_for(agent.wait_started(), 10)
        for name in connected:
            source = next(s for s in agent.sources if s.name == name)
            await wait_for(lambda s=source: s.status.state == "connected", timeout=15)
            await wait_for(lambda n=name: f"{n}.cycle_done" in agent.rules.current, timeout=10)
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


# --- the PLC handshake survives a full disk --------------------------------------------------------


class SmallDisk:
    """A 32 MB tmpfs for the data dir, filled up with a file and freed again: a real full disk.

    32 MB leaves the WAL room to grow between checkpoints once the file is gone.
    """

    def __init__(self, root: Path):
        self.root = root
        self.filler = root / "filler"

    async def fill(self) -> None:
        await asyncio.to_thread(fill, self.filler)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """Needs mount(8) and root (CI runs the suite as root in its container); skipped elsewhere."""
    mountpoint = tmp_path / "small-disk"
    mountpoint.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("a real full disk needs root and mount(8) for a small tmpfs")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mountpoint)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()}")
    disk = SmallDisk(mountpoint)
    try:
        yield disk
    finally:
        disk.free()
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill(path: Path) -> None:
    """Write ``path`` until the filesystem says ENOSPC (unbuffered: nothing left over for the close)."""
    chunk = b"\0" * (64 * 1024)
    try:
        with path.open("wb", buffering=0) as handle:
            while True:
                handle.write(chunk)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise


async def test_plc_handshake_comes_back_after_a_full_disk(
    tmp_path: Path, small_disk: SmallDisk, press_server: PressSimulator
) -> None:
    settings = agent_config(small_disk.root / "data", {"press7": press_server.endpoint}, tmp_path / "events.jsonl")
    agent = Agent(settings)
    async with running(agent, connected=("press7",)), contextlib.AsyncExitStack() as cleanup:
        # Whatever fails below, the disk has room again before the agent stops (else its close fails too).
        cleanup.callback(small_disk.free)
        for n in range(3):
            assert await press_server.complete_cycle(f"WO-A{n}", "FILL-500", 10, wait_ack=10.0)
        await small_disk.fill()
        # Telemetry keeps the buffer writing: the next commit hits the full disk for real.
        temperature = 20.0

        async def refusing() -> bool:
            nonlocal temperature
            temperature += 1.0
            await press_server.set_temperature(temperature)
            return agent.buffer.refusing_writes is not None

        await wait_for(refusing, timeout=20, interval=0.1)
        ready, _ = agent.readiness()
        assert not ready
        # Cycles while the disk is full: a cycle is acknowledged only if its commit made it (SQLite may
        # still fit a small commit into the WAL file's existing space); none is acknowledged uncommitted.
        for n in range(20):
            await press_server.complete_cycle(f"WO-F{n}", "FILL-500", 5, wait_ack=0.5)
        small_disk.free()
        await wait_for(lambda: agent.buffer.refusing_writes is None, timeout=20)
        await wait_for(lambda: agent.readiness()[0], timeout=5)
        # Space is back: every later cycle is acknowledged again, without a restart.
        for n in range(5):
            acked = await press_server.complete_cycle(f"WO-B{n}", "FILL-500", 20 + n, wait_ack=10.0)
            assert acked, f"cycle WO-B{n} after the disk had room again was not acknowledged"
        await wait_for(lambda: "WO-B4" in subjects_of(tmp_path / "events.jsonl"), timeout=10)
        assert agent.status()["tasks"]["plc-acks-press7"]["restarts"] == 0
    subjects = subjects_of(tmp_path / "events.jsonl")
    assert {f"WO-A{n}" for n in range(3)} | {f"WO-B{n}" for n in range(5)} <= subjects
    acknowledged = {cycle[0] for cycle in press_server.acknowledged}
    assert acknowledged <= subjects, "every acknowledged cycle, also one during the full disk, was delivered"
    assert agent.acks.status()["press7"]["pending"] == 0


def subjects_of(path: Path) -> set[str]:
    return {event["subject"] for event in completions(path)}


def completions(path: Path) -> list[dict[str, Any]]:
    """The production.completed events a JSON Lines sink wrote."""
    events = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [event for event in events if event["type"] == "io.plantgate.production.completed"]


# --- supervision: a crashing component is restarted, shown and counted -----------------------------


class FlakySink:
    """A sink whose ``run`` crashes once and whose ``deliver`` crashes twice, then works (keeps what it got)."""

    def __init__(self, name: str = "flaky") -> None:
        self.name = name
        self.lanes: frozenset[Lane] = frozenset(LANES)
        self.status = ComponentStatus(name=name, kind="test")
        self.batch_max = 100
        self.runs = 0
        self.deliveries = 0
        self.got: list[dict[str, Any]] = []

    async def run(self) -> None:
        self.runs += 1
        if self.runs == 1:
            raise RuntimeError("sink run exploded")
        self.status.set_state("connected")
        await asyncio.Event().wait()

    async def deliver(self, batch: Sequence[BufferedEvent]) -> Sequence[Outcome]:
        self.deliveries += 1
        if self.deliveries <= 2:
            raise RuntimeError(f"deliver exploded ({self.deliveries})")
        self.got.extend(json.loads(event.body) for event in batch)
        return [ACKED] * len(batch)


async def test_crashing_sink_and_delivery_loop_are_restarted_and_shown(
    tmp_path: Path, press_server: PressSimulator
) -> None:
    settings = agent_config(tmp_path / "data", {"press7": press_server.endpoint}, tmp_path / "events.jsonl")
    sink = FlakySink()
    agent = Agent(settings, sinks=[sink])
    async with running(agent, connected=("press7",)):
        for n in range(3):
            assert await press_server.complete_cycle(f"WO-S{n}", "FILL-500", 1, wait_ack=10.0)
        await wait_for(
            lambda: {f"WO-S{n}" for n in range(3)} <= {e["subject"] for e in sink.got},
            timeout=20,
            message=lambda: str(agent.status()["tasks"]),
        )
        # The sink's run is restarted on its own backoff, independent of the deliveries.
        await wait_for(lambda: sink.status.state == "connected", timeout=10, message="sink run restarted")
        status = agent.status()
        tasks = status["tasks"]
        assert tasks["sink-flaky"]["restarts"] == 1
        assert "sink run exploded" in tasks["sink-flaky"]["last_error"]
        assert tasks["deliver-flaky"]["restarts"] == 2
        assert "deliver exploded (2)" in tasks["deliver-flaky"]["last_error"]
        assert tasks["deliver-flaky"]["state"] == "running"
        # Connected again; the crashes stay in the tasks' records above (the sink's own last_error
        # depends on whether a delivery crash came before or after its reconnect).
        assert status["sinks"]["flaky"]["state"] == "connected"
        assert tasks["source-press7"]["restarts"] == 0
        assert tasks["plc-acks-press7"]["state"] == "running"
        assert agent.readiness()[0]
        metrics = agent.metrics.render()[0].decode()
        restarts = [
            line
            for line in metrics.splitlines()
            if line.startswith("plantgate_") and "flaky" in line and "restart" in line
        ]
        assert restarts, "restarts are counted in /metrics"
    assert agent.state == "stopped"


async def test_supervise_restarts_with_backoff_and_passes_cancellation() -> None:
    stopping = asyncio.Event()
    health = TaskHealth("t", "agent", "agent")
    calls = 0
    restarted: list[int] = []

    async def run() -> None:
        nonlocal calls
        calls += 1
        if calls < 4:
            raise ValueError(f"boom {calls}")
        await asyncio.Event().wait()

    task = asyncio.create_task(
        supervise(
            health,
            run,
            stopping=stopping,
            on_restart=lambda: restarted.append(calls),
            backoff=Backoff(base=0.01, cap=0.05),
        )
    )
    await wait_for(lambda: calls == 4, timeout=5)
    assert health.restarts == 3 and restarted == [1, 2, 3]
    assert health.last_error == "ValueError: boom 3"
    assert health.state == "running"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_backoff_never_exceeds_its_cap_and_reset_starts_over() -> None:
    backoff = Backoff(base=0.2, cap=5.0)
    delays = [backoff.next_delay() for _ in range(10_000)]
    assert max(delays) <= 5.0
    assert min(delays) >= 0.0
    assert backoff.attempt <= 64
    backoff.reset()
    assert backoff.next_delay() <= 0.2


# --- PLC acks: per source, retried until written or the PLC moved on -------------------------------


@pytest.fixture
async def second_press() -> AsyncIterator[PressSimulator]:
    async with started_press() as simulator:
        yield simulator


async def test_acks_are_per_source_retried_until_written_or_abandoned(
    tmp_path: Path, press_server: PressSimulator, second_press: PressSimulator
) -> None:
    settings = agent_config(
        tmp_path / "data",
        {"press7": press_server.endpoint, "press8": second_press.endpoint},
        tmp_path / "events.jsonl",
    )
    agent = Agent(settings)
    async with running(agent, connected=("press7", "press8")):
        # press8 refuses the ack write (a locked PLC): its ack is retried ...
        await second_press.set_writable("CycleAck", False)
        waiting = asyncio.create_task(second_press.complete_cycle("WO-8a", "FILL-500", 1, wait_ack=30.0))
        await wait_for(lambda: agent.acks.status()["press8"]["last_error"] is not None, timeout=10)
        # ... while press7's handshake goes on undelayed.
        for n in range(3):
            assert await press_server.complete_cycle(f"WO-7{n}", "FILL-500", 1, wait_ack=5.0)
        assert agent.acks.status()["press8"]["pending"] == 1
        # Once press8 takes writes again, the same ack is written: the cycle is acknowledged.
        await second_press.set_writable("CycleAck", True)
        assert await asyncio.wait_for(waiting, 30)
        await wait_for(lambda: agent.acks.status()["press8"]["pending"] == 0, timeout=5)
        written_before = agent.acks.status()["press8"]["written"]
        # A cycle the PLC gives up on (its trigger falls) has its ack abandoned, not written late.
        await second_press.set_writable("CycleAck", False)
        assert not await second_press.complete_cycle("WO-8b", "FILL-500", 1, wait_ack=1.0)
        await wait_for(lambda: agent.acks.status()["press8"]["abandoned"] == 1, timeout=10)
        await second_press.set_writable("CycleAck", True)
        assert second_press.value("CycleAck") is False, "no stale ack left for the next cycle"
        assert await second_press.complete_cycle("WO-8c", "FILL-500", 1, wait_ack=10.0)
        await wait_for(lambda: agent.acks.status()["press8"]["written"] == written_before + 1, timeout=5)
        assert agent.acks.status()["press8"]["abandoned"] == 1
        assert agent.acks.status()["press7"]["abandoned"] == 0
    assert [cycle[0] for cycle in second_press.acknowledged] == ["WO-8a", "WO-8c"]


async def test_ack_is_retried_across_a_reconnect_until_written(tmp_path: Path, press_server: PressSimulator) -> None:
    settings = agent_config(
        tmp_path / "data",
        {"press7": press_server.endpoint},
        tmp_path / "events.jsonl",
        source_options='timeout = "1s"\nwatchdog_interval = "500ms"',
    )
    agent = Agent(settings)
    source = agent.sources[0]
    async with running(agent, connected=("press7",)):
        await press_server.set_writable("CycleAck", False)
        waiting = asyncio.create_task(press_server.complete_cycle("WO-R1", "FILL-500", 1, wait_ack=40.0))
        await wait_for(lambda: agent.acks.status()["press7"]["last_error"] is not None, timeout=10)
        # The PLC stops answering on this connection: the source reconnects, the cycle still waits.
        press_server.freeze()
        await wait_for(lambda: source.status.state != "connected", timeout=20)
        await press_server.set_writable("CycleAck", True)
        await wait_for(lambda: source.status.state == "connected", timeout=20)
        temperature = 30.0

        async def acknowledged() -> bool:
            nonlocal temperature
            temperature += 1.0  # the line goes on: news from the PLC after the reconnect
            await press_server.set_temperature(temperature)
            return waiting.done()

        await wait_for(
            acknowledged,
            timeout=20,
            interval=0.1,
            message=lambda: (
                f"temperature heard {agent.rules.current['press7.temperature'].value}, written "
                f"{temperature}; subscription {source.status.info.get('subscription')}"
            ),
        )
        assert waiting.result(), "the ack was written after the reconnect"
        status = agent.acks.status()["press7"]
        assert status["written"] >= 1 and status["abandoned"] == 0 and status["pending"] == 0
    assert [cycle[0] for cycle in press_server.acknowledged] == ["WO-R1"]


class RecordingSource:
    """A source of our own for the ack writer alone: records writes, fails the first ``failures``."""

    def __init__(self, name: str, tags: Sequence[str], failures: int = 0) -> None:
        self.name = name
        self.status = ComponentStatus(name=name, kind="test")
        self.status.set_state("connected")
        self._tags = list(tags)
        self.failures = failures
        self.written: list[tuple[str, Any]] = []

    def tags(self) -> Sequence[str]:
        return self._tags

    async def run(self, output: Any) -> None:
        await asyncio.Event().wait()

    async def write(self, tag: str, value: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("a bug in the source's write")
        self.written.append((tag, value))


async def test_ack_writer_survives_failed_and_cancelled_commits_and_a_raising_write() -> None:
    source = RecordingSource("p", ["p.done", "p.ack"], failures=1)
    writer = PlcAckWriter([source], triggers={"p.ack": "p.done"}, current={})
    task = asyncio.create_task(writer.run("p"))
    try:
        loop = asyncio.get_running_loop()
        failed: asyncio.Future[None] = loop.create_future()
        failed.set_exception(BufferError("disk full while closing"))
        cancelled: asyncio.Future[None] = loop.create_future()
        cancelled.cancel()
        committed: asyncio.Future[None] = loop.create_future()
        writer.submit(failed, [PlcAck("p.ack")])
        writer.submit(cancelled, [PlcAck("p.ack")])
        writer.submit(committed, [PlcAck("p.ack")])
        await wait_for(lambda: writer.status()["p"]["abandoned"] == 2, timeout=5)
        assert writer.pending("p") == 1, "the committed cycle's ack waits for its commit"
        committed.set_result(None)
        await wait_for(lambda: writer.status()["p"]["last_error"] is not None, timeout=5)
        writer.observe("p")  # news from the source after the failed write: the retry may go
        await wait_for(lambda: source.written == [("p.ack", True)], timeout=5)
        assert writer.status()["p"] == {
            "pending": 0,
            "written": 1,
            "abandoned": 2,
            "last_error": "RuntimeError: a bug in the source's write",
        }
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
