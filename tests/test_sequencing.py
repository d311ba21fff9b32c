"""The sequencing guard: a consumption is held until its work order's release committed.

On a real buffer file (held across a close and reopen, expiry into a dead letter,
replay back through the guard, ``plantgate buffer stats --json``) and end to end on
a running agent: the MES webhook posts a consumption, the agent restarts, the
release is posted, and both reach a JSON Lines file in that order.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from agent.cli import main
from agent.events import CloudEvent, decode_event, make_event
from agent.pipeline import Agent
from agent.settings import ConfigError, SequencingRule, parse_settings
from buffer import NO_SINK, Buffer, BufferAdmin, ReplayRequest
from tests.buffered import take_all
from tests.peers.waiting import wait_for

RULE = SequencingRule(type="material.consumed", after=["workorder.released", "workorder.started"], hold="30m")
SINKS = {"cloud": ["transaction"]}
CONSUMED = "io.plantgate.material.consumed"
RELEASED = "io.plantgate.workorder.released"


def consumed(n: int, work_order: str = "WO-1") -> CloudEvent:
    return make_event(
        "material.consumed",
        id=f"consumed-{work_order}-{n}",
        source="plantgate/plant-01/gw/mes",
        time=datetime(2026, 12, 4, 10, 0, n, tzinfo=UTC),
        site="plant-01",
        subject=work_order,
        data={"work_order": work_order, "item": "RAW-7", "quantity": {"value": str(n), "uom": "KGM"}},
    )


def released(work_order: str = "WO-1") -> CloudEvent:
    return make_event(
        "workorder.released",
        id=f"released-{work_order}",
        source="plantgate/plant-01/gw/mes",
        time=datetime(2026, 12, 4, 9, 0, tzinfo=UTC),
        site="plant-01",
        subject=work_order,
        data={"work_order": work_order},
    )


@pytest.fixture
async def buffer(tmp_path: Path) -> AsyncIterator[Buffer]:
    buffer = Buffer(tmp_path / "buffer.db", sinks=SINKS, sequencing=[RULE])
    await buffer.open()
    yield buffer
    await buffer.close()


async def test_a_consumption_waits_for_its_release_and_follows_it_under_its_id(buffer: Buffer) -> None:
    cloud = buffer.cursor("cloud", ["transaction"])
    await buffer.append([consumed(1)])
    assert await take_all(buffer, cloud) == []
    held = buffer.held_summary()
    assert (held.count, held.types) == (1, {"material.consumed": 1})
    stats = (await buffer.stats()).held
    assert stats is not None and stats.count == 1

    await buffer.append([released()])
    out = await take_all(buffer, cloud)
    assert [(e.type, e.id) for e in out] == [(RELEASED, "released-WO-1"), (CONSUMED, "consumed-WO-1-1")]
    assert out[0].seq < out[1].seq
    assert decode_event(out[1].body)["sequence"] == f"{out[1].seq:020d}"
    assert buffer.held_summary().count == 0 and (await buffer.stats()).held is None


async def test_held_events_of_one_order_come_out_in_arrival_order_also_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = Buffer(path, sinks=SINKS, sequencing=[RULE])
    await buffer.open()
    cloud = buffer.cursor("cloud", ["transaction"])
    for n in (3, 1, 2):  # arrival order, not event time, decides
        await buffer.append([consumed(n)])
    await buffer.append([consumed(1, "WO-2")])
    await buffer.close()

    buffer = Buffer(path, sinks=SINKS, sequencing=[RULE])
    await buffer.open()
    try:
        cloud = buffer.cursor("cloud", ["transaction"])
        assert buffer.held_summary().count == 4
        await buffer.append([released()])
        out = await take_all(buffer, cloud)
        assert [e.id for e in out] == ["released-WO-1", "consumed-WO-1-3", "consumed-WO-1-1", "consumed-WO-1-2"]
        assert buffer.held_summary().count == 1  # WO-2 still waits
    finally:
        await buffer.close()
    # The release is remembered across a restart: a later consumption of WO-1 passes straight through.
    buffer = Buffer(path, sinks=SINKS, sequencing=[RULE])
    await buffer.open()
    try:
        cloud = buffer.cursor("cloud", ["transaction"])
        await buffer.append([consumed(9)])
        assert [e.id for e in await take_all(buffer, cloud)] == ["consumed-WO-1-9"]
        assert buffer.held_summary().count == 1
    finally:
        await buffer.close()


async def test_an_order_released_first_lets_its_consumptions_pass_and_other_types_are_not_held(buffer: Buffer) -> None:
    cloud = buffer.cursor("cloud", ["transaction"])
    started = make_event(
        "workorder.started",
        id="started-WO-5",
        source="plantgate/plant-01/gw/mes",
        time=datetime(2026, 12, 4, 9, 0, tzinfo=UTC),
        site="plant-01",
        subject="WO-5",
        data={"work_order": "WO-5"},
    )
    completed = make_event(
        "production.completed",
        id="completed-WO-6",
        source="plantgate/plant-01/gw/press7",
        time=datetime(2026, 12, 4, 9, 0, tzinfo=UTC),
        site="plant-01",
        subject="WO-6",
        data={"work_order": "WO-6", "item": "P-1", "quantity": {"value": "1", "uom": "EA"}},
    )
    await buffer.append([started, consumed(1, "WO-5"), completed])
    out = await take_all(buffer, cloud)
    assert [e.id for e in out] == ["started-WO-5", "consumed-WO-5-1", "completed-WO-6"]
    assert buffer.held_summary().count == 0


async def test_after_hold_a_held_event_is_a_dead_letter_and_replay_after_the_release_delivers_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "buffer.db"
    quick = SequencingRule(type="material.consumed", after=["workorder.released"], hold="300ms")
    buffer = Buffer(path, sinks=SINKS, sequencing=[quick])
    await buffer.open()
    try:
        cloud = buffer.cursor("cloud", ["transaction"])
        await buffer.append([consumed(1)])

        async def expired() -> bool:
            await buffer.maintain()  # the agent's once-a-second upkeep
            await buffer.commit_now()
            return buffer.dead_letter_count == 1

        await wait_for(expired, timeout=5, message="the held consumption expires")
        [letter] = await buffer.dead_letters()
        assert (letter.id, letter.sink, letter.type) == ("consumed-WO-1-1", NO_SINK, CONSUMED)
        assert letter.reason.startswith("sequencing: ") and "WO-1" in letter.reason
        assert buffer.held_summary().count == 0 and await take_all(buffer, cloud) == []

        admin = BufferAdmin(buffer, sinks=SINKS)
        # Replayed before the release: back through the guard, held again (not delivered).
        assert (await admin.replay(ReplayRequest(reason="sequencing:"))).replayed == 1
        await buffer.commit_now()
        assert buffer.held_summary().count == 1 and buffer.dead_letter_count == 0
        assert await take_all(buffer, cloud) == []
        await wait_for(expired, timeout=5, message="held again, it expires again")

        await buffer.append([released()])
        assert [e.id for e in await take_all(buffer, cloud)] == ["released-WO-1"]
        assert (await admin.replay(ReplayRequest(ids=["consumed-WO-1-1"]))).replayed == 1
        out = await take_all(buffer, cloud)
        assert [e.id for e in out] == ["consumed-WO-1-1"] and buffer.dead_letter_count == 0
        # Something held again, for the stats of the stopped agent's file below.
        await buffer.append([consumed(1, "WO-7"), consumed(2, "WO-7")])
    finally:
        await buffer.close()

    config = tmp_path / "plantgate.toml"
    config.write_text(
        f'[agent]\nsite = "plant-01"\nid = "gw-1"\ndata_dir = "{tmp_path}"\n\n'
        '[http]\nlisten = "127.0.0.1:9"\n\n[[sinks.jsonl]]\nname = "cloud"\npath = "events.jsonl"\n'
    )
    code = await asyncio.to_thread(main, ["buffer", "stats", "--json", "-c", str(config)])
    out_text, _ = capsys.readouterr()
    assert code == 0
    held = json.loads(out_text)["held"]
    assert held["count"] == 2 and held["types"] == {"material.consumed": 2}
    assert held["oldest_age_seconds"] >= 0
    code = await asyncio.to_thread(main, ["buffer", "stats", "-c", str(config)])
    table, _ = capsys.readouterr()
    assert code == 0 and "(held)" in table and "material.consumed" in table


TOKEN = "sequencing-token"
AGENT_CONFIG = """
[agent]
site = "plant-seq"
id = "gw-seq"
data_dir = "{data_dir}"

[http]
listen = "127.0.0.1:0"
ingest_token_file = "ingest-token"

[[sources.mes]]
name = "mes"
mode = "webhook"

[[sinks.jsonl]]
name = "file"
path = "events.jsonl"

[[sequencing]]
type = "material.consumed"
after = ["workorder.released", "workorder.started"]
hold = "30m"
"""


def posted(type_: str, id_: str, data: dict[str, object]) -> dict[str, object]:
    return {
        "specversion": "1.0",
        "id": id_,
        "source": "mes://plant/mes",
        "type": type_,
        "time": "2026-12-04T10:00:00Z",
        "subject": "WO-42",
        "data": data,
    }


def written(path: Path) -> list[dict[str, object]]:
    """The transactions the JSON Lines sink wrote, in file order."""
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [event for event in events if event["lane"] == "transaction"]  # not the agent's own events


async def test_end_to_end_a_consumption_posted_before_a_restart_follows_its_release(tmp_path: Path) -> None:
    (tmp_path / "ingest-token").write_text(TOKEN, encoding="utf-8")
    out = tmp_path / "events.jsonl"
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/cloudevents-batch+json"}
    consumption = posted(
        CONSUMED, "mes-consumed-1", {"work_order": "WO-42", "item": "RAW-7", "quantity": {"value": "2", "uom": "KGM"}}
    )
    release = posted(RELEASED, "mes-released-1", {"work_order": "WO-42"})

    async def post_to_agent(body: list[dict[str, object]], then: str) -> None:
        agent = Agent(parse_settings(AGENT_CONFIG.format(data_dir=tmp_path)))
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        try:
            await asyncio.wait_for(agent.wait_started(), 10)
            assert agent.http is not None
            async with httpx.AsyncClient(base_url=agent.http.url, headers=headers, timeout=10) as client:
                response = await client.post("/v1/events", content=json.dumps(body))
                assert response.status_code == 202, response.text
                if then == "held":
                    await wait_for(lambda: agent.buffer.held_summary().count == 1, message="held")
                    status = (await client.get("/status")).json()
                    assert status["buffer"]["held"]["count"] == 1
                    assert status["buffer"]["held"]["types"] == {"material.consumed": 1}
                    metrics = (await client.get("/metrics")).text
                    assert 'plantgate_events_held{type="material.consumed"} 1.0' in metrics
                else:
                    await wait_for(lambda: len(written(out)) >= 2, message=lambda: f"written: {written(out)}")
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

    started = time.monotonic()
    await post_to_agent([consumption], "held")
    assert written(out) == []  # nothing delivered while held, also not at shutdown
    await post_to_agent([release], "delivered")
    events = written(out)
    assert [e["id"] for e in events] == ["mes-released-1", "mes-consumed-1"]
    assert str(events[0]["sequence"]) < str(events[1]["sequence"])
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ('type = "material.consumed"\nafter = []', "after"),
        ('type = "material.eaten"\nafter = ["workorder.released"]', "material.eaten"),
        ('type = "material.consumed"\nafter = ["telemetry.samples"]', "telemetry.samples"),
        ('type = "material.consumed"\nafter = ["workorder.released"]\nhold = "0s"', "hold"),
        ('type = "material.consumed"\nafter = ["material.consumed"]', "cannot wait for itself"),
    ],
)
def test_a_sequencing_entry_is_checked(entry: str, error: str) -> None:
    text = f'[agent]\nsite = "plant-01"\nid = "gw-1"\n\n[[sequencing]]\n{entry}\n'
    with pytest.raises(ConfigError, match=error):
        parse_settings(text)


def test_sequencing_types_are_canonical_and_the_same_type_is_guarded_once() -> None:
    base = '[agent]\nsite = "plant-01"\nid = "gw-1"\n'
    rule = '\n[[sequencing]]\ntype = "io.plantgate.material.consumed"\nafter = ["workorder.started"]\nhold = "5m"\n'
    [parsed] = parse_settings(base + rule).sequencing
    assert (parsed.type, parsed.after, parsed.hold) == ("material.consumed", ["workorder.started"], 300.0)
    with pytest.raises(ConfigError, match="earlier"):
        parse_settings(base + rule + rule)


async def test_held_events_stay_held_where_the_rules_are_unknown_and_pass_once_no_rule_guards_them(
    tmp_path: Path,
) -> None:
    path = tmp_path / "buffer.db"
    buffer = Buffer(path, sinks=SINKS, sequencing=[RULE])
    await buffer.open()
    buffer.cursor("cloud", ["transaction"])
    await buffer.append([consumed(1), consumed(2)])
    await buffer.close()

    unknown = Buffer(path, sinks=SINKS)  # as ``plantgate buffer`` opens a stopped agent's file
    await unknown.open()
    try:
        await unknown.maintain()
        await unknown.commit_now()
        assert unknown.held_summary().count == 2
        assert await take_all(unknown, unknown.cursor("cloud", ["transaction"])) == []
    finally:
        await unknown.close()

    unguarded = Buffer(path, sinks=SINKS, sequencing=[])  # the entry was removed from the config
    await unguarded.open()
    try:
        await unguarded.maintain()
        await unguarded.commit_now()
        out = await take_all(unguarded, unguarded.cursor("cloud", ["transaction"]))
        assert [e.id for e in out] == ["consumed-WO-1-1", "consumed-WO-1-2"]
        assert unguarded.held_summary().count == 0 and unguarded.dead_letter_count == 0
    finally:
        await unguarded.close()


async def test_an_offline_replay_goes_back_through_the_guard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "buffer.db"
    quick = SequencingRule(type="material.consumed", after=["workorder.released"], hold="300ms")
    buffer = Buffer(path, sinks=SINKS, sequencing=[quick])
    await buffer.open()
    try:
        buffer.cursor("cloud", ["transaction"])
        await buffer.append([consumed(1, "WO-9")])

        async def expired() -> bool:
            await buffer.maintain()
            await buffer.commit_now()
            return buffer.dead_letter_count == 1

        await wait_for(expired, timeout=5, message="the held consumption expires")
    finally:
        await buffer.close()

    config = tmp_path / "plantgate.toml"
    config.write_text(
        f'[agent]\nsite = "plant-01"\nid = "gw-1"\ndata_dir = "{tmp_path}"\n\n'
        '[[sinks.jsonl]]\nname = "cloud"\npath = "events.jsonl"\nlanes = ["transaction"]\n\n'
        '[[sequencing]]\ntype = "material.consumed"\nafter = ["workorder.released"]\nhold = "30m"\n'
    )
    # The agent is stopped: the CLI opens the file itself, with the config's guard.
    code = await asyncio.to_thread(main, ["buffer", "replay", "--reason", "sequencing:", "--json", "-c", str(config)])
    out, _ = capsys.readouterr()
    assert code == 0 and json.loads(out) == {"replayed": 1, "failed": 0}
    buffer = Buffer(path, sinks=SINKS, sequencing=[quick])
    await buffer.open()
    try:
        # Its work order is still not released: held again, not put in the sink's backlog.
        assert buffer.held_summary().count == 1
        assert await take_all(buffer, buffer.cursor("cloud", ["transaction"])) == []
    finally:
        await buffer.close()
