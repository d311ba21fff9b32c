"""Back-pressure end to end: a buffer at ``max_size_mb`` while the only sink's broker is down.

Telemetry is evicted first (with its gap event); once none is left the buffer
refuses writes: a source's hand-over waits (so its peer keeps the data: the PLC
is not acknowledged, a webhook caller gets 503), ``/readyz`` says why. When the
broker is back the backlog drains, the buffer has room again and the waiting
hand-over returns: nothing was lost, no restart needed.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.events import CloudEvent, make_event, stable_id
from agent.health import ComponentStatus
from agent.pipeline import Agent
from agent.settings import parse_settings
from agent.source import SourceOutput
from tests.peers.mosquitto import MosquittoBroker, MqttCollector
from tests.peers.waiting import wait_for

CONFIG = """
[agent]
site = "plant-full"
id = "gw-full"
data_dir = "{data_dir}"

[buffer]
max_size_mb = 1

[[sinks.mqtt]]
name = "cloud"
url = "{url}"
client_id = "plantgate-full"
topic_prefix = "full"
reconnect_max_backoff = "500ms"
"""
T0 = datetime(2026, 12, 4, 6, 0, tzinfo=UTC)


class FeedSource:
    """A source the test hands events through, exactly as the MES or a scanner source does."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.status = ComponentStatus(name=name, kind="feed")
        self.output: SourceOutput | None = None
        self.ready = asyncio.Event()

    def tags(self) -> list[str]:
        return []

    async def run(self, output: SourceOutput) -> None:
        self.output = output
        self.status.set_state("connected")
        self.ready.set()
        await asyncio.Event().wait()

    async def write(self, tag: str, value: Any) -> None:
        raise NotImplementedError


def batch(kind: str, start: int, n: int) -> list[CloudEvent]:
    """``n`` events of 400 bytes of incompressible payload each (the file grows as it would in a plant)."""
    events = []
    for i in range(start, start + n):
        at = T0 + timedelta(milliseconds=i)
        if kind == "telemetry":
            data: dict[str, Any] = {
                "samples": [
                    {"tag": "line.weight", "time": at.isoformat(), "value": secrets.token_hex(200), "quality": "good"}
                ]
            }
            name, subject = "telemetry.samples", "line.weight"
        else:
            data = {"work_order": f"WO-{i}", "quantity": {"value": "1", "uom": "EA"}, "note": secrets.token_hex(200)}
            name, subject = "production.completed", f"WO-{i}"
        events.append(
            make_event(
                name, id=stable_id("full", kind, i), source="erp://feed", time=at, site="x", subject=subject, data=data
            )
        )
    return events


async def test_full_buffer_evicts_telemetry_then_back_pressures_then_recovers(
    tmp_path: Path, mosquitto_factory: Callable[..., MosquittoBroker]
) -> None:
    broker = mosquitto_factory(persistence=True, extra_config=["max_queued_messages 0"])
    # A subscriber with a persistent session: what is published while it is away is kept for it.
    MqttCollector(broker.host, broker.port, client_id="erp", clean_session=False).start().stop()
    broker.stop()  # the only sink is down from the start

    feed = FeedSource("feed")
    agent = Agent(parse_settings(CONFIG.format(data_dir=tmp_path, url=broker.url)), sources=[feed], serve_http=False)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    blocked: asyncio.Task[None] | None = None
    try:
        await asyncio.wait_for(feed.ready.wait(), 10)
        output = feed.output
        assert output is not None
        buffer = agent.buffer
        cap = buffer.max_size_bytes

        # 1. Telemetry fills the buffer past its cap: the oldest is evicted.
        sent_telemetry = 0
        for _ in range(6):  # about 3 MB of telemetry for a 1 MB cap
            await output.events(batch("telemetry", sent_telemetry, 1000))
            sent_telemetry += 1000
        await wait_for(lambda: buffer.depth("cloud", "telemetry") < sent_telemetry, timeout=20)
        assert buffer.refusing_writes is None and agent.readiness()[0]

        # 2. Transactions keep coming: once no telemetry is left to evict, the buffer refuses writes.
        sent = 0
        for _ in range(40):
            if output.refusing() is not None:
                break
            await output.events(batch("transaction", sent, 500))
            sent += 500
            if buffer.size_bytes >= cap:
                # At the cap: maintenance evicts telemetry or starts refusing before more comes.
                await wait_for(lambda: output.refusing() is not None or buffer.size_bytes < cap, timeout=10)
        # The size is checked after every few hundred KB committed: no burst overshoots the cap by much.
        assert buffer.size_bytes < 2 * cap
        reason = output.refusing()
        assert reason is not None and "full" in reason
        assert buffer.depth("cloud", "telemetry") == 0, "telemetry goes before any transaction is refused"
        ready, body = agent.readiness()
        assert not ready and "full" in body["reason"]
        # A hand-over now waits: the source's peer keeps its data (no 202, no PLC acknowledgement).
        blocked = asyncio.create_task(output.events(batch("transaction", sent, 10)))
        await asyncio.sleep(0)
        assert not blocked.done()

        # 3. The broker comes back: the backlog drains, room returns, the waiting hand-over completes.
        broker.start()
        with MqttCollector(broker.host, broker.port, client_id="erp", clean_session=False) as collector:
            await asyncio.wait_for(blocked, 60)
            await wait_for(lambda: agent.readiness()[0], timeout=10)
            assert buffer.refusing_writes is None
            total = sent + 10
            await wait_for(
                lambda: sum(m.topic.endswith("/production.completed") for m in collector.messages) >= total,
                timeout=60,
            )
            gaps = [json.loads(m.payload) for m in collector.messages if m.topic.endswith("/telemetry.gap")]
    finally:
        if blocked is not None and not blocked.done():
            blocked.cancel()
        stop.set()
        await asyncio.wait_for(task, 30)

    ids = [json.loads(m.payload)["id"] for m in collector.messages if m.topic.endswith("/production.completed")]
    assert sorted(set(ids)) == sorted(e.id for e in batch("transaction", 0, total)), "every transaction, none lost"
    assert gaps and gaps[0]["data"]["source"] == "feed" and gaps[0]["data"]["evicted_events"] > 0
