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
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.pipeline import Agent
from agent.settings import Settings, parse_settings
from agent.simulator import PressSimulator
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


def press_source(name: str, endpoint: str) -> str:
    return f"""
[[sources.opcua]]
name = "{name}"
endpoint = "{endpoint}"
publishing_interval = "50ms"
reconnect_max_backoff = "500ms"
""" + PRESS_TAGS.format(p=name)


def agent_config(data_dir: Path, presses: dict[str, str], events_file: Path, extra: str = "") -> Settings:
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
    text += "".join(press_source(name, endpoint) for name, endpoint in presses.items())
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


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MB tmpfs for the data dir (we run as root in CI); skipped where mounting is not allowed."""
    mountpoint = tmp_path / "small-disk"
    mountpoint.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root and mount(8) for a real small filesystem")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mountpoint)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill(path: Path) -> None:
    """Write ``path`` until the filesystem says ENOSPC."""
    chunk = b"\0" * (64 * 1024)
    with path.open("wb") as handle:
        try:
            while True:
                handle.write(chunk)
                handle.flush()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise


async def test_plc_handshake_comes_back_after_a_full_disk(
    tmp_path: Path, small_disk: Path, press_server: PressSimulator
) -> None:
    settings = agent_config(small_disk / "data", {"press7": press_server.endpoint}, tmp_path / "events.jsonl")
    agent = Agent(settings)
    async with running(agent, connected=("press7",)):
        for n in range(3):
            assert await press_server.complete_cycle(f"WO-A{n}", "FILL-500", 10, wait_ack=10.0)
        filler = small_disk / "filler"
        await asyncio.to_thread(fill, filler)
        # Telemetry keeps the buffer writing: the next commit hits ENOSPC for real.
        temperature = 20.0

        async def refusing() -> bool:
            nonlocal temperature
            temperature += 1.0
            await press_server.set_temperature(temperature)
            return agent.buffer.refusing_writes is not None

        await wait_for(refusing, timeout=20, interval=0.1)
        ready, _ = agent.readiness()
        assert not ready
        # Cycles while the disk is full are not committed, so the PLC gets no ack for them.
        full_cycles = [await press_server.complete_cycle(f"WO-F{n}", "FILL-500", 5, wait_ack=0.5) for n in range(20)]
        assert not any(full_cycles)
        filler.unlink()
        await wait_for(lambda: agent.buffer.refusing_writes is None, timeout=20)
        await wait_for(lambda: agent.readiness()[0], timeout=5)
        # Space is back: every later cycle is acknowledged again, without a restart.
        for n in range(5):
            acked = await press_server.complete_cycle(f"WO-B{n}", "FILL-500", 20 + n, wait_ack=10.0)
            assert acked, f"cycle WO-B{n} after the disk had room again was not acknowledged"
        delivered = lambda: {event["subject"] for event in completions(tmp_path / "events.jsonl")}  # noqa: E731
        await wait_for(lambda: "WO-B4" in delivered(), timeout=10, message=lambda: f"depth {agent.buffer.depth('file', 'transaction')} delivered {sorted(delivered())}")
    subjects = {event["subject"] for event in completions(tmp_path / "events.jsonl")}
    assert {f"WO-A{n}" for n in range(3)} | {f"WO-B{n}" for n in range(5)} <= subjects
    assert agent.acks.status()["press7"]["pending"] == 0


def completions(path: Path) -> list[dict[str, Any]]:
    """The production.completed events a JSON Lines sink wrote."""
    events = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [event for event in events if event["type"] == "io.plantgate.production.completed"]
