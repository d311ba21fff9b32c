"""``plantgate demo --simulators-only``: the simulators alone, and the config it writes runs against them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import sys
from pathlib import Path

import pytest

from agent.settings import load_settings
from tests.peers.waiting import wait_for

PLANTGATE = Path(sys.executable).parent / "plantgate"


def jsonl_sources(path: Path) -> set[str]:
    if not path.exists():
        return set()
    sources = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            sources.add(json.loads(line)["source"].rsplit("/", 1)[-1])
    return sources


@pytest.mark.timeout(90)
async def test_the_written_config_passes_check_and_runs_against_the_simulators(tmp_path: Path) -> None:
    simulators = await asyncio.create_subprocess_exec(
        str(PLANTGATE), "demo", "--simulators-only", "--seconds", "60", "--data-dir", str(tmp_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    agent: asyncio.subprocess.Process | None = None
    try:
        assert simulators.stdout is not None
        lines: list[str] = []

        async def config_announced() -> bool:
            line = (await asyncio.wait_for(simulators.stdout.readline(), 20)).decode()  # type: ignore[union-attr]
            assert line, "the simulators ended early: " + "".join(lines)
            lines.append(line)
            return line.startswith("  then: ")

        await wait_for(config_announced, timeout=30, message=lambda: "".join(lines))
        shown = "".join(lines)
        config = tmp_path / "simulators.toml"
        assert f"config for them: {config}" in shown, shown
        assert f"check -c {config}" in shown and f"run -c {config}" in shown, shown
        # Every simulator says where it is, and what it offers.
        for expected in (
            "opc.tcp://127.0.0.1:",
            "ns=2;s=Press7.CycleDone",
            "tcp://127.0.0.1:",
            "holding:0 uint32",
            "/records",
            "/v1/outcomes",
            "/v1/events",
        ):
            assert expected in shown, (expected, shown)
        settings = load_settings(config)
        endpoints = shown.split("config for them:")[0]
        for source in settings.source_configs():
            address = (
                getattr(source, "endpoint", None) or getattr(source, "connect", None) or getattr(source, "url", None)
            )
            if address is not None:
                assert address in endpoints, (source.name, address, endpoints)

        check = await asyncio.create_subprocess_exec(
            str(PLANTGATE), "check", "--connect", "--timeout", "10", "-c", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(check.communicate(), 40)
        assert check.returncode == 0, (out.decode()[-3000:], err.decode()[-2000:])
        assert "0 errors" in out.decode(), out.decode()

        agent = await asyncio.create_subprocess_exec(
            str(PLANTGATE), "run", "-c", str(config),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        events = tmp_path / "events.jsonl"
        wanted = {"press7", "filler2", "dock1", "mes", "mes-rest"}
        await wait_for(
            lambda: wanted <= jsonl_sources(events),
            timeout=30,
            interval=0.2,
            message=lambda: f"sources seen: {jsonl_sources(events)}",
        )
        agent.send_signal(signal.SIGTERM)
        await asyncio.wait_for(agent.wait(), 20)
        assert agent.returncode == 0

        simulators.send_signal(signal.SIGINT)
        rest, errors = await asyncio.wait_for(simulators.communicate(), 20)
        assert simulators.returncode == 0
        ending = rest.decode()
        # An agent going away is no error of the simulators (no traceback from the OPC UA server).
        assert "Traceback" not in errors.decode(), errors.decode()[-3000:]
        # The simulators saw the agent come and go, and their receiver got its deliveries.
        assert "an agent answers" in ending, ending
        stopped = re.search(r"simulators stopped: .*receiver got (\d+) events", ending)
        assert stopped and int(stopped.group(1)) > 0, ending
    finally:
        for process in (agent, simulators):
            if process is not None and process.returncode is None:
                process.kill()
                await process.wait()


def test_a_well_known_port_in_use_gives_way_to_a_free_one() -> None:
    from agent.demo import WELL_KNOWN_PORTS, Ports

    wanted = WELL_KNOWN_PORTS["receiver"]
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):  # held by something else already: it is in use all the same
            holder.bind(("127.0.0.1", wanted))
            holder.listen(1)
        ports = Ports.well_known()
    assert "receiver" in ports.fallbacks
    assert ports.receiver != wanted and ports.receiver > 0
