"""What an operator reads in the journal of ``plantgate run``: commits, outages, the drain.

The agent is a child process (``--log-format text``, although its stderr is a
file, where the default would be JSON) reading a real OPC UA press and
publishing to a real mosquitto that the test stops twice within a minute: the
second outage must be logged as plainly as the first, not swallowed by the
repeat limiter.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import sys
from pathlib import Path

from agent.simulator import PressSimulator
from tests.peers.mosquitto import MosquittoBroker, free_port
from tests.peers.waiting import wait_for
from tests.test_crash import CONFIG as CRASH_CONFIG
from tests.test_crash import status_of

PREFIX = "plantgate/plant-logs"
FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def entries(path: Path, message: str) -> list[dict[str, str]]:
    """The key=value fields of every line whose message is ``message``."""
    found = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        _, sep, rest = line.partition(f": {message} ")
        if sep or line.endswith(f": {message}"):
            found.append({key: value.strip('"') for key, value in FIELD.findall(rest)})
    return found


async def test_every_outage_and_commit_is_in_the_log_with_ids_lengths_and_the_drain(
    tmp_path: Path, press_server: PressSimulator, mosquitto: MosquittoBroker
) -> None:
    http_port = free_port()
    config = tmp_path / "plantgate.toml"
    config.write_text(
        CRASH_CONFIG.format(
            data_dir=tmp_path / "data",
            http_port=http_port,
            endpoint=press_server.endpoint,
            mqtt_url=mosquitto.url,
            prefix=PREFIX,
        ),
        encoding="utf-8",
    )
    log_path = tmp_path / "agent.log"
    with log_path.open("ab") as log:
        agent = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "plantgate"),
            "run",
            "-c",
            str(config),
            "--log-format",
            "text",
            stdout=log,
            stderr=log,
        )
    try:
        await wait_for(
            lambda: (status_of(http_port) or {}).get("sinks", {}).get("cloud", {}).get("state") == "connected",
            timeout=20,
        )
        assert await press_server.complete_cycle("WO-L1", "FILL-500", 3, wait_ack=10.0)
        await wait_for(lambda: any(e.get("subject") == "WO-L1" for e in entries(log_path, "Transaction committed")))

        for outage in (1, 2):
            mosquitto.stop()
            await wait_for(lambda n=outage: len(entries(log_path, "Sink outage started")) >= n, timeout=15)
            # Cycles while the broker is away: a backlog for the drain to report.
            for n in range(3):
                assert await press_server.complete_cycle(f"WO-O{outage}{n}", "FILL-500", n, wait_ack=10.0)
            mosquitto.start()
            await wait_for(lambda n=outage: len(entries(log_path, "Backlog drained")) >= n, timeout=30)
    finally:
        agent.send_signal(signal.SIGTERM)
        await asyncio.wait_for(agent.wait(), 30)

    started = entries(log_path, "Sink outage started")
    ended = entries(log_path, "Sink outage ended")
    drained = entries(log_path, "Backlog drained")
    assert len(started) == 2 and all(e["sink"] == "cloud" for e in started)
    assert len(ended) == 2 and all(float(e["outage_seconds"]) > 0 for e in ended)
    assert all(int(e["backlog"]) >= 3 for e in ended), "each outage left the cycles made meanwhile"
    assert [e["summary"].startswith("drained ") for e in drained] == [True, True]
    committed = entries(log_path, "Transaction committed")
    subjects = {e["subject"] for e in committed}
    assert {"WO-L1", "WO-O10", "WO-O12", "WO-O22"} <= subjects
    assert all(len(e["event_id"]) >= 16 and e["sequence"].isdigit() for e in committed)


async def test_a_plc_that_is_off_is_one_warning_not_a_library_traceback(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on: the PLC is off
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "plantgate.toml"
    config.write_text(
        f"""
[agent]
site = "plant-logs"
id = "gw-off"
data_dir = "{tmp_path / "data"}"

[[sources.opcua]]
name = "press7"
endpoint = "opc.tcp://127.0.0.1:{port}"
reconnect_max_backoff = "300ms"

  [[sources.opcua.tags]]
  tag = "press7.temperature"
  node = "ns=2;s=Press7.Temperature"

[[sinks.jsonl]]
name = "file"
path = "events.jsonl"
""",
        encoding="utf-8",
    )
    log_path = tmp_path / "agent.log"
    with log_path.open("ab") as log:
        agent = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "plantgate"),
            "run",
            "-c",
            str(config),
            "--log-format",
            "json",
            stdout=log,
            stderr=log,
        )
    try:
        await wait_for(lambda: "Cannot connect to OPC UA server" in log_path.read_text(encoding="utf-8"), timeout=20)
        # Several refused attempts later (the backoff is capped at 300 ms): still no library noise.
        await wait_for(lambda: len(log_path.read_text(encoding="utf-8").splitlines()) >= 3, timeout=10)
    finally:
        agent.send_signal(signal.SIGTERM)
        await asyncio.wait_for(agent.wait(), 30)
    lines = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines()]
    noise = [line for line in lines if line["logger"].startswith("asyncua") or "exc" in line]
    assert not noise, noise
    assert sum(line["message"] == "Cannot connect to OPC UA server, retrying" for line in lines) == 1
