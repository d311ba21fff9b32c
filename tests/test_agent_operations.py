"""The running agent's operator surface: events handed by a source, the buffer admin API, runtime quarantine.

The agent runs in process with a JSON Lines sink and its real HTTP server on a
free loopback port; requests go over real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.events import CloudEvent, make_event
from agent.pipeline import Agent, _SourceInlet
from agent.settings import ConfigError, parse_settings
from agent.source import Source
from tests.peers.waiting import wait_for

TOKEN = "operator-secret-token"

CONFIG = """
[agent]
site = "plant-ops"
id = "gw-ops"
data_dir = "{data_dir}"

[http]
listen = "127.0.0.1:0"
ingest_token_file = "ingest-token"

[mappings.items]
"P-100-OLD" = {{ obsolete = true }}
"FILL-500" = "40012345000017"

[[sinks.jsonl]]
name = "file"
path = "events.jsonl"
"""


class _MesLike:
    """A source that only hands over canonical events (as the MES webhook will)."""

    def __init__(self, name: str) -> None:
        from agent.health import ComponentStatus

        self.name = name
        self.status = ComponentStatus(name=name, kind="test")

    def tags(self) -> list[str]:
        return []

    async def run(self, output: Any) -> None:
        self.status.set_state("connected")
        await asyncio.Event().wait()

    async def write(self, tag: str, value: Any) -> None:
        raise NotImplementedError


def mes_event(item: str, event_id: str) -> CloudEvent:
    return make_event(
        "material.consumed",
        id=event_id,
        source="mes://plant/erp-bridge",
        time=datetime(2026, 12, 4, 8, 0, tzinfo=UTC),
        site="somewhere",
        subject="WO-4711",
        data={"work_order": "WO-4711", "item": item, "quantity": {"value": "2.5", "uom": "kg"}},
        correlationid="corr-1",
    )


def committed_dead_letters(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return [row[0] for row in db.execute("SELECT id FROM dead_letters ORDER BY n")]


def head(path: Path) -> bytes:
    return path.read_bytes()[:4]


def lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@contextlib.asynccontextmanager
async def running_agent(data_dir: Path) -> AsyncIterator[tuple[Agent, _SourceInlet, httpx.AsyncClient]]:
    (data_dir / "ingest-token").write_text(TOKEN + "\n", encoding="utf-8")
    settings = parse_settings(CONFIG.format(data_dir=data_dir))
    mes = _MesLike("mes")
    sources: list[Source] = [mes]
    agent = Agent(settings, sources=sources)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await asyncio.wait_for(agent.wait_started(), 10)
        assert agent.http is not None
        async with httpx.AsyncClient(base_url=agent.http.url, timeout=10) as client:
            yield agent, _SourceInlet(agent, mes), client
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_events_from_a_source_are_committed_mapped_and_delivered_under_their_id(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as (agent, inlet, _):
        await inlet.events([mes_event("FILL-500", "mes-1"), mes_event("FILL-500", "mes-1")])
        # Returned only after the commit: the buffer holds it now, once (same id twice is one fact).
        assert agent.buffer.duplicates_suppressed == 1
        # Counted for the source that sent it twice, and the window shown in /status.
        metrics = agent.metrics.render()[0].decode()
        assert 'plantgate_duplicates_suppressed_total{source="mes"} 1.0' in metrics
        dedupe = agent.status()["buffer"]["dedupe"]
        assert dedupe["ids"] >= 1 and dedupe["window_seconds"] == 86400
        out = tmp_path / "events.jsonl"
        await wait_for(lambda: any(e["id"] == "mes-1" for e in lines(out)), message="MES event delivered")
    delivered = [e for e in lines(tmp_path / "events.jsonl") if e["id"] == "mes-1"]
    assert len(delivered) == 1
    event = delivered[0]
    assert event["source"] == "plantgate/plant-ops/gw-ops/mes"
    assert event["originsource"] == "mes://plant/erp-bridge"
    assert event["site"] == "plant-ops"
    assert event["correlationid"] == "corr-1"
    assert event["data"]["item"] == "40012345000017"
    assert event["lane"] == "transaction"


async def test_buffer_admin_over_the_running_agent_needs_the_token(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as (agent, inlet, client):
        await inlet.events([mes_event("P-100-OLD", "mes-obsolete")])  # a dead letter counts as stored
        assert agent.buffer.dead_letter_count == 1
        # Returned only after the commit: another connection already sees it in the file.
        assert committed_dead_letters(tmp_path / "buffer.db") == ["mes-obsolete"]

        assert (await client.get("/v1/buffer/dead-letters")).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert (await client.post("/v1/buffer/purge", json={"dead_letters": True}, headers=wrong)).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}

        letters = (await client.get("/v1/buffer/dead-letters", headers=auth)).json()
        assert [(d["id"], d["sink"]) for d in letters] == [("mes-obsolete", "-")]
        assert "obsolete" in letters[0]["reason"]

        stats = (await client.get("/v1/buffer/stats", headers=auth)).json()
        assert stats["dead_letters"] == 1 and "file" in stats["sinks"]

        # Monitoring sees the dead letter per sink, with its reason and its age.
        await agent.refresh_metrics()
        status = (await client.get("/status")).json()
        held = status["buffer"]["dead_letters_by_sink"]["-"]
        assert held["count"] == 1 and held["oldest_age_seconds"] >= 0
        assert [reason for reason in held["reasons"] if "P-100-OLD" in reason and "obsolete" in reason]
        assert status["sinks"]["file"]["dead_letters"]["count"] == 0
        metrics = (await client.get("/metrics")).text
        assert 'plantgate_dead_letters_held{sink="-"} 1.0' in metrics
        assert 'plantgate_dead_letters_held{sink="file"} 0.0' in metrics
        assert 'plantgate_dead_letter_oldest_age_seconds{sink="-"}' in metrics

        # The running config still calls the code obsolete: the replay fails again, the letter stays.
        replay = await client.post("/v1/buffer/replay", json={"all": True}, headers=auth)
        assert replay.status_code == 200 and replay.json() == {"replayed": 0, "failed": 1}
        assert len((await client.get("/v1/buffer/dead-letters", headers=auth)).json()) == 1

        purge = await client.post("/v1/buffer/purge", json={"dead_letters": True}, headers=auth)
        assert purge.status_code == 200 and purge.json()["dead_letters"] == 1
        assert (await client.get("/v1/buffer/dead-letters", headers=auth)).json() == []
        assert 'plantgate_dead_letters_held{sink="-"} 0.0' in (await client.get("/metrics")).text
        assert (await client.get("/status")).json()["buffer"]["dead_letters_by_sink"] == {}


async def test_a_buffer_found_corrupt_while_running_is_moved_aside_and_reported(tmp_path: Path) -> None:
    # A file with some pages to damage.
    async with running_agent(tmp_path) as (_, inlet, _client):
        await inlet.events([mes_event("FILL-500", f"warm-{n}") for n in range(200)])
    path = tmp_path / "buffer.db"
    async with running_agent(tmp_path) as (agent, inlet, _client):
        data = bytearray(path.read_bytes())
        data[0:] = b"\xde\xad\xbe\xef" * (len(data) // 4)
        with path.open("r+b") as file:  # in place: the agent's connections keep the same file
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        await inlet.events([mes_event("FILL-500", "after-damage")])
        out = tmp_path / "events.jsonl"
        await wait_for(
            lambda: any(e["type"] == "io.plantgate.agent.buffer.quarantined" for e in lines(out)),
            timeout=20,
            message="quarantine reported",
        )
        await wait_for(lambda: any(e["id"] == "after-damage" for e in lines(out)), message="event after the damage")
        assert agent.buffer.refusing_writes is None
    report = next(e for e in lines(tmp_path / "events.jsonl") if e["type"].endswith("agent.buffer.quarantined"))
    assert head(Path(report["data"]["moved_to"])) == b"\xde\xad\xbe\xef"  # byte for byte, not deleted
    assert report["data"]["path"] == str(path)


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", "10.1.3.9:9480"])
def test_a_listen_address_beyond_loopback_without_a_token_does_not_start(listen: str) -> None:
    # Buffer administration (replay, purge) and MES ingest must never be open to the plant network.
    text = CONFIG.format(data_dir="/tmp/unused").replace('ingest_token_file = "ingest-token"\n', "")
    with pytest.raises(ConfigError) as caught:
        parse_settings(text.replace('listen = "127.0.0.1:0"', f'listen = "{listen}"'))
    assert caught.value.key == "http.listen" and "needs http.ingest_token_file" in caught.value.message
