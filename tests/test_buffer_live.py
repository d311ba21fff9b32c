"""``plantgate buffer`` against a live ``plantgate run`` while it delivers.

The agent is a child process reading a real OPC UA press and publishing to a
real mosquitto. Some cycles post an obsolete item code: dead letters made before
any sink, while the PLC handshake is still acknowledged. The operator's commands
go through the running agent's HTTP API (it holds the file's lock), with the
ingest token, and delivery never stops meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.simulator import PressSimulator
from tests.peers.mosquitto import MosquittoBroker, MqttCollector, free_port
from tests.peers.waiting import wait_for
from tests.test_crash import CONFIG as CRASH_CONFIG
from tests.test_crash import status_of

PREFIX = "plantgate/plant-live"
COMPLETED = f"{PREFIX}/transaction/production.completed"
TOKEN = "live-operator-token"

CONFIG = (
    CRASH_CONFIG.replace('site = "plant-crash"', 'site = "plant-live"')
    .replace('id = "gw-crash"', 'id = "gw-live"')
    .replace('listen = "127.0.0.1:{http_port}"', 'listen = "127.0.0.1:{http_port}"\ningest_token_file = "token"')
    + """
[mappings.items]
"P-100-OLD" = {{ obsolete = true }}
"""
)


def plantgate(*args: str) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "plantgate"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("admin_token", [False, True], ids=["ingest-token", "admin-token"])
async def test_buffer_commands_work_on_a_live_agent_while_it_delivers(
    tmp_path: Path, press_server: PressSimulator, mosquitto: MosquittoBroker, admin_token: bool
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "token").write_text(TOKEN + "\n", encoding="utf-8")
    http_port = free_port()
    config = tmp_path / "plantgate.toml"
    text = CONFIG.format(
        data_dir=data_dir,
        http_port=http_port,
        endpoint=press_server.endpoint,
        mqtt_url=mosquitto.url,
        prefix=PREFIX,
    )
    if admin_token:
        # Replay and purge then take only the admin token: the CLI must send that one.
        (data_dir / "admin-token").write_text("live-admin-token\n", encoding="utf-8")
        text = text.replace(
            'ingest_token_file = "token"', 'ingest_token_file = "token"\nadmin_token_file = "admin-token"'
        )
    config.write_text(text, encoding="utf-8")
    cfg = str(config)
    collector = MqttCollector(mosquitto.host, mosquitto.port, COMPLETED).start()
    with (tmp_path / "agent.log").open("ab") as log:
        agent = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "plantgate"), "run", "-c", cfg, stdout=log, stderr=log
        )
    try:
        await wait_for(lambda: status_of(http_port) is not None, timeout=20)
        await wait_for(
            lambda: (status_of(http_port) or {}).get("sources", {}).get("press7", {}).get("state") == "connected",
            timeout=20,
        )

        def delivered() -> list[str]:
            return [json.loads(m.payload)["subject"] for m in collector.snapshot()]

        # Two cycles with an obsolete item: dead letters; the PLC is acknowledged all the same.
        for n in range(2):
            assert await press_server.complete_cycle(f"WO-OLD{n}", "P-100-OLD", 5, wait_ack=10.0)
        assert await press_server.complete_cycle("WO-GOOD0", "FILL-500", 7, wait_ack=10.0)
        await wait_for(lambda: "WO-GOOD0" in delivered(), timeout=20)

        stats = await asyncio.to_thread(plantgate, "buffer", "stats", "--json", "-c", cfg)
        assert stats.returncode == 0, stats.stderr
        assert json.loads(stats.stdout)["dead_letters"] == 2
        listed = await asyncio.to_thread(plantgate, "buffer", "dead-letters", "--json", "-c", cfg)
        letters = json.loads(listed.stdout)
        assert sorted(d["subject"] for d in letters) == ["WO-OLD0", "WO-OLD1"]
        assert {d["sink"] for d in letters} == {"-"} and all("obsolete" in d["reason"] for d in letters)
        table = await asyncio.to_thread(plantgate, "buffer", "dead-letters", "-c", cfg)
        assert all(d["id"] in table.stdout for d in letters), "full ids, for replay --id"

        # The running agent's mapping still calls the code obsolete: the replay fails again, nothing lost.
        replay = await asyncio.to_thread(plantgate, "buffer", "replay", "--reason", "obsolete", "--json", "-c", cfg)
        assert replay.returncode == 1, replay.stderr  # some failed again: scripts see it in the exit code
        assert json.loads(replay.stdout) == {"replayed": 0, "failed": 2}

        # Delivery goes on between the commands.
        assert await press_server.complete_cycle("WO-GOOD1", "FILL-500", 8, wait_ack=10.0)
        await wait_for(lambda: "WO-GOOD1" in delivered(), timeout=20)

        purge = await asyncio.to_thread(plantgate, "buffer", "purge", "--dead-letters", "--yes", "--json", "-c", cfg)
        assert purge.returncode == 0, purge.stderr
        assert json.loads(purge.stdout)["dead_letters"] == 2
        after = await asyncio.to_thread(plantgate, "buffer", "stats", "--json", "-c", cfg)
        assert json.loads(after.stdout)["dead_letters"] == 0
        status = status_of(http_port)
        assert status is not None and status["buffer"]["dead_letters"] == 0

        assert await press_server.complete_cycle("WO-GOOD2", "FILL-500", 9, wait_ack=10.0)
        await wait_for(lambda: "WO-GOOD2" in delivered(), timeout=20)
    finally:
        agent.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(agent.wait(), 30)
        collector.stop()
    assert returncode == 0
    assert sorted(delivered()) == ["WO-GOOD0", "WO-GOOD1", "WO-GOOD2"], "each good cycle once, no dead letter leaked"
