"""Per-sink ``max_rate``: the agent paces every sink alike, and live transactions overtake a paced backlog."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.events import CloudEvent, Lane, make_event, stable_id
from agent.health import ComponentStatus
from agent.pacing import RatePacer
from agent.pipeline import Agent
from agent.rules import RuleOutput
from agent.settings import parse_settings
from agent.sink import ACKED, BufferedEvent, Outcome
from tests.peers.waiting import wait_for

RATE = 500
CONFIG = """
[agent]
site = "plant-pace"
id = "gw-pace"
data_dir = "{data_dir}"

[[sinks.jsonl]]
name = "paced"
path = "unused.jsonl"
max_rate = {rate}
"""
T0 = datetime(2026, 12, 4, 6, 0, tzinfo=UTC)


class RecordingSink:
    """A sink that acknowledges everything and records when each batch came."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lanes: frozenset[Lane] = frozenset({"transaction", "operational", "telemetry"})
        self.status = ComponentStatus(name=name, kind="recording")
        self.batch_max = 1000
        self.batches: list[tuple[float, list[str]]] = []

    async def run(self) -> None:
        self.status.set_state("connected")
        await asyncio.Event().wait()

    async def deliver(self, batch: Sequence[BufferedEvent]) -> Sequence[Outcome]:
        self.batches.append((time.monotonic(), [event.id for event in batch]))
        return [ACKED] * len(batch)

    def delivered(self) -> list[str]:
        return [event_id for _, ids in self.batches for event_id in ids]


def telemetry(n: int) -> list[CloudEvent]:
    return [
        make_event(
            "telemetry.samples",
            id=stable_id("pace", "telemetry", i),
            source="plantgate/plant-pace/gw-pace/press",
            time=T0 + timedelta(milliseconds=i),
            site="plant-pace",
            subject="press.temperature",
            data={
                "samples": [
                    {
                        "tag": "press.temperature",
                        "time": (T0 + timedelta(milliseconds=i)).isoformat(),
                        "value": 20.0 + i,
                        "quality": "good",
                    }
                ]
            },
        )
        for i in range(n)
    ]


def completion(work_order: str) -> CloudEvent:
    return make_event(
        "production.completed",
        id=stable_id("pace", "completion", work_order),
        source="plantgate/plant-pace/gw-pace/press",
        time=T0,
        site="plant-pace",
        subject=work_order,
        data={"work_order": work_order, "quantity": {"value": "12", "uom": "EA"}},
    )


@contextlib.asynccontextmanager
async def paced_agent(data_dir: Path) -> AsyncIterator[tuple[Agent, RecordingSink]]:
    settings = parse_settings(CONFIG.format(data_dir=data_dir, rate=RATE))
    sink = RecordingSink("paced")
    agent = Agent(settings, sources=[], sinks=[sink], serve_http=False)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await asyncio.wait_for(agent.wait_started(), 10)
        yield agent, sink
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_max_rate_paces_a_backlog_in_small_bursts(tmp_path: Path) -> None:
    async with paced_agent(tmp_path) as (agent, sink):
        backlog = telemetry(500)
        future = agent.accept("press", RuleOutput(events=backlog))
        assert future is not None
        await future
        await wait_for(lambda: len(sink.delivered()) >= 501, timeout=20)  # agent.started + the backlog

    burst = RatePacer(RATE).burst
    assert all(len(ids) <= burst for _, ids in sink.batches)
    # A token bucket of `burst` tokens refilled at RATE/s cannot deliver n events faster than (n - burst) / RATE.
    first, last = sink.batches[0][0], sink.batches[-1][0]
    delivered = sum(len(ids) for _, ids in sink.batches[1:])
    assert last - first >= (delivered - burst) / RATE * 0.95
    assert sink.delivered()[1:] == [e.id for e in backlog]


async def test_a_live_transaction_overtakes_a_paced_telemetry_backlog(tmp_path: Path) -> None:
    async with paced_agent(tmp_path) as (agent, sink):
        backlog = telemetry(1000)  # two seconds' worth at RATE
        future = agent.accept("press", RuleOutput(events=backlog))
        assert future is not None
        await future
        await wait_for(lambda: len(sink.batches) >= 3)
        batches_before = len(sink.batches)
        live = completion("WO-4711")
        future = agent.accept("press", RuleOutput(events=[live]))
        assert future is not None
        await future
        await wait_for(lambda: live.id in sink.delivered(), timeout=10)
        at = next(i for i, (_, ids) in enumerate(sink.batches) if live.id in ids)
        telemetry_left = len(backlog) - sum(1 for i in sink.delivered() if i != live.id) + 1
        await wait_for(lambda: len(sink.delivered()) >= len(backlog) + 2, timeout=20)

    # The transaction went out in one of the next two bursts (one may have been taken already), ...
    assert at <= batches_before + 1
    # ... while most of the telemetry backlog was still waiting behind it.
    assert telemetry_left > len(backlog) // 2
    assert sorted(sink.delivered()) == sorted([*(e.id for e in backlog), live.id, sink.delivered()[0]])


async def test_status_shows_each_lanes_delivery_rate_drain_estimate_and_headroom(tmp_path: Path) -> None:
    async with paced_agent(tmp_path) as (agent, sink):
        future = agent.accept("press", RuleOutput(events=telemetry(1500)))  # three seconds' worth at RATE
        assert future is not None
        await future
        await wait_for(lambda: len(sink.delivered()) >= 400)
        agent.rates.sample()
        status = agent.status()
        lane = status["sinks"]["paced"]["lanes"]["telemetry"]
        # Paced at RATE: the measured rate cannot be above it (plus one burst), and the rest drains at it.
        assert 0 < lane["rate_per_second"] <= RATE * 1.2
        assert lane["depth"] > 0 and lane["drain_seconds"] is not None
        assert abs(lane["drain_seconds"] - lane["depth"] / lane["rate_per_second"]) < 1.0
        buffer = status["buffer"]
        assert buffer["disk_free_bytes"] > 0
        assert 0 < buffer["headroom_bytes"] <= buffer["max_size_bytes"]
        empty = status["sinks"]["paced"]["lanes"]["transaction"]
        assert empty["depth"] == 0 and empty["drain_seconds"] == 0.0
