"""``[mappings]`` reloaded on SIGHUP by a real ``plantgate run`` child process.

An MES webhook event with an obsolete item becomes a dead letter; the config file
is rewritten with the item mapped; ``kill -HUP``; ``/status`` counts it as
replayable (nothing is replayed by itself); ``plantgate buffer replay --reason
obsolete`` sends it again, and it reaches the JSON Lines sink under its original
id with the new item code. A config file made invalid then HUP keeps the running
mappings and logs one error naming the file and line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from tests.peers.mosquitto import free_port
from tests.peers.waiting import wait_for

TOKEN = "mes-ingest-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OBSOLETE = '"P-100-OLD" = { obsolete = true }'
MAPPED = '"P-100-OLD" = "40012345000099"'

CONFIG = """\
[agent]
site = "plant-mes"
id = "gw-mes"
data_dir = "{data_dir}"

[http]
listen = "127.0.0.1:{port}"
ingest_token_file = "ingest-token"

[mappings]
unknown_items = "pass"

[mappings.items]
{item}
"FILL-500" = "40012345000017"

[[sources.mes]]
name = "mes"
mode = "webhook"

[[sinks.jsonl]]
name = "file"
path = "events.jsonl"
"""


def event(event_id: str, item: str) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "mes://plant/erp-bridge",
        "type": "io.plantgate.material.consumed",
        "time": "2026-12-04T08:00:00Z",
        "subject": "WO-4711",
        "data": {"work_order": "WO-4711", "item": item, "quantity": {"value": "2.5", "uom": "EA"}},
    }


def lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_config(directory: Path, port: int, item: str) -> Path:
    path = directory / "plantgate.toml"
    path.write_text(CONFIG.format(data_dir=directory, port=port, item=item), encoding="utf-8")
    return path


def plantgate() -> str:
    return str(Path(sys.executable).parent / "plantgate")


class RunningAgent:
    """A ``plantgate run`` child with its config file, log file and HTTP client."""

    def __init__(self, directory: Path, process: asyncio.subprocess.Process, client: httpx.AsyncClient, port: int):
        self.directory = directory
        self.process = process
        self.client = client
        self.port = port
        self.config = directory / "plantgate.toml"
        self.log = directory / "agent.log"

    def write_config(self, item: str) -> None:
        write_config(self.directory, self.port, item)

    def hangup(self) -> None:
        os.kill(self.process.pid, signal.SIGHUP)

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text(encoding="utf-8").splitlines() if line.startswith("{")]

    def logged(self, text: str) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if text in line["message"]]

    async def status(self) -> dict[str, Any]:
        response = await self.client.get("/status")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    async def dead_letters(self) -> int:
        count: int = (await self.status())["buffer"]["dead_letters"]
        return count

    async def replayable(self) -> dict[str, Any] | None:
        result: dict[str, Any] | None = (await self.status())["buffer"]["replayable_dead_letters"]
        return result

    async def post(self, body: dict[str, Any]) -> httpx.Response:
        headers = {**AUTH, "Content-Type": "application/cloudevents+json"}
        return await self.client.post("/v1/events", content=json.dumps(body).encode(), headers=headers)


@contextlib.asynccontextmanager
async def running(directory: Path) -> AsyncIterator[RunningAgent]:
    (directory / "ingest-token").write_text(TOKEN + "\n", encoding="utf-8")
    port = free_port()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        config = write_config(directory, port, OBSOLETE)
        with (directory / "agent.log").open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                plantgate(), "run", "-c", str(config), "--log-format", "json", stderr=log
            )
        agent = RunningAgent(directory, process, client, port)
        try:

            async def ready() -> bool:
                assert process.returncode is None, agent.log.read_text(encoding="utf-8")
                with contextlib.suppress(httpx.TransportError):
                    return (await client.get("/readyz")).status_code == 200
                return False

            await wait_for(ready, timeout=30, interval=0.1, message="the agent answers /readyz")
            yield agent
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 30)
                except TimeoutError:
                    process.kill()
                    await process.wait()


async def cli(*args: str) -> tuple[int, str]:
    child = await asyncio.create_subprocess_exec(
        plantgate(), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(child.communicate(), 60)
    assert child.returncode is not None
    return child.returncode, out.decode()


async def test_a_reload_that_fixes_a_dead_letter_says_so_and_the_replay_delivers_it(tmp_path: Path) -> None:
    async with running(tmp_path) as agent:
        assert await agent.replayable() is None, "no reload yet"
        response = await agent.post(event("mes-old-1", "P-100-OLD"))
        assert response.status_code == 202, response.text
        assert (await agent.post(event("mes-ok-1", "FILL-500"))).status_code == 202
        await wait_for(agent.dead_letters, message="the obsolete item is a dead letter")
        assert await agent.dead_letters() == 1
        out = tmp_path / "events.jsonl"
        await wait_for(lambda: "mes-ok-1" in {e["id"] for e in lines(out)}, message="the good event delivered")

        agent.write_config(MAPPED)
        agent.hangup()
        fixed = await wait_for(agent.replayable, message="a reload shows in /status")
        assert fixed["count"] == 1
        assert fixed["mappings_reloaded_at"].endswith("Z")
        [hint] = await wait_for(lambda: agent.logged("dead letters now replayable"))
        assert hint["message"] == "1 dead letters now replayable; run plantgate buffer replay --reason obsolete"
        [reloaded] = agent.logged("Mappings reloaded")
        assert "the rest of the config is not reloaded" in reloaded["message"]
        assert reloaded["config"] == str(agent.config)
        # Nothing is replayed by itself: the operator decides.
        assert await agent.dead_letters() == 1
        assert "mes-old-1" not in {e["id"] for e in lines(out)}

        # New events map with the reloaded mappings at once.
        assert (await agent.post(event("mes-new-1", "P-100-OLD"))).status_code == 202
        await wait_for(lambda: "mes-new-1" in {e["id"] for e in lines(out)}, message="mapped by the new mappings")

        code, printed = await cli("buffer", "replay", "--reason", "obsolete", "-c", str(agent.config))
        assert code == 0, printed
        delivered = await wait_for(
            lambda: [e for e in lines(out) if e["id"] == "mes-old-1"], message="the replayed dead letter delivered"
        )
        assert [e["data"]["item"] for e in delivered] == ["40012345000099"]
        assert delivered[0]["source"] == "plantgate/plant-mes/gw-mes/mes"
        assert await agent.dead_letters() == 0

        async def none_left() -> bool:
            status = await agent.replayable()
            return status is not None and status["count"] == 0

        await wait_for(none_left, message="/status counts what is still replayable")
        assert agent.process.returncode is None


async def test_an_invalid_config_on_reload_keeps_the_running_mappings(tmp_path: Path) -> None:
    async with running(tmp_path) as agent:
        # Valid TOML, a valid mapping, but unknown_items has no such choice.
        agent.write_config(MAPPED)
        text = agent.config.read_text(encoding="utf-8").replace('unknown_items = "pass"', 'unknown_items = "drop"')
        agent.config.write_text(text, encoding="utf-8")
        line = text.splitlines().index('unknown_items = "drop"') + 1
        agent.hangup()
        [error] = await wait_for(lambda: agent.logged("Mappings not reloaded"), message="the reload error is logged")
        assert error["level"] == "ERROR"
        assert error["error"].startswith(f"{agent.config}:{line}: mappings.unknown_items:"), error
        assert error["line"] == line
        assert agent.process.returncode is None
        assert await agent.replayable() is None, "no reload happened"
        # The old mappings still hold: the obsolete item is still a dead letter.
        assert (await agent.post(event("mes-old-2", "P-100-OLD"))).status_code == 202
        await wait_for(agent.dead_letters, message="still a dead letter under the running mappings")
        assert agent.logged("Mappings reloaded") == []

        # A TOML syntax error is reported with its line too, once per HUP.
        agent.config.write_text(text.replace(MAPPED, '"P-100-OLD" = '), encoding="utf-8")
        agent.hangup()
        errors = await wait_for(lambda: len(agent.logged("Mappings not reloaded")) == 2 and agent.logged("not rel"))
        assert "TOML syntax error" in errors[1]["error"]
        assert errors[1]["error"].startswith(f"{agent.config}:")
        assert errors[1]["line"] is not None
        assert (await agent.status())["agent"]["state"] == "running"
