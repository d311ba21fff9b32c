"""The delivery journal in the buffer file: what it records for each event, and how it is read back.

Everything runs against a real SQLite buffer file in ``tmp_path``; ``journal_rows``
peeks into the file with sqlite3 (read-only) where the observable is what is stored.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.events import CloudEvent, Lane, Sample, TelemetrySamples, encode_event, make_event
from agent.sink import ACKED
from buffer import NO_SINK, Buffer, DeadLetter

T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
SOURCE = "plantgate/plant-01/gw/press7"
NAME_OF_LANE: dict[Lane, str] = {
    "transaction": "production.completed",
    "operational": "machine.state.changed",
    "telemetry": "telemetry.samples",
}
_counter = 0


def event(
    lane: Lane = "transaction",
    *,
    id: str | None = None,
    data: Any = None,
    subject: str | None = None,
    name: str | None = None,
    originsource: str | None = None,
) -> CloudEvent:
    """A canonical event of ``lane`` with a fresh id (unless given)."""
    global _counter
    _counter += 1
    if lane == "telemetry":
        data = TelemetrySamples(samples=[Sample("press7.temperature", T0, float(_counter))])
    return make_event(
        name or NAME_OF_LANE[lane],
        id=id or f"{lane}-{_counter}",
        source=SOURCE,
        time=T0 + timedelta(seconds=_counter),
        site="plant-01",
        subject=subject,
        data=data if data is not None else {"n": _counter},
        originsource=originsource,
    )


async def open_buffer(path: Path, **options: Any) -> Buffer:
    buffer = Buffer(path, **options)
    await buffer.open()
    return buffer


@pytest.fixture
async def buffer(tmp_path: Path) -> AsyncIterator[Buffer]:
    buffer = await open_buffer(tmp_path / "buffer.db")
    try:
        yield buffer
    finally:
        await buffer.close()


def journal_rows(path: Path, table: str = "journal") -> int:
    """Rows of a journal table, read from the file itself (0 when the table does not exist)."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        exists = db.execute("SELECT count(*) FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]) if exists else 0


RULE_CONTEXT = {
    "source": "press7",
    "rule": "press7-count",
    "values": {"press7.count": {"value": 42, "time": "2024-05-01T10:00:00Z", "quality": "good"}},
    "trigger": "trigger-1",
}


async def test_a_transaction_is_journaled_with_its_trigger_keys_and_body(buffer: Buffer) -> None:
    made = event(id="fact-1", data={"work_order": "WO-7", "lot": "LOT-3", "quantity": 5}, subject="press7")
    before = time.time()
    await buffer.append([made], contexts={"fact-1": RULE_CONTEXT})
    entries = await buffer.trace("fact-1")
    assert len(entries) == 1
    entry = entries[0]
    assert entry.id == "fact-1"
    assert entry.type == made.type and entry.lane == "transaction"
    assert entry.seq == int(made.sequence or "0") == buffer.last_sequence
    assert before <= entry.committed <= time.time()
    assert entry.source == SOURCE and entry.subject == "press7"
    assert entry.work_order == "WO-7" and entry.lot == "LOT-3"
    assert entry.source_time == f"2024-05-01T10:00:{_counter:02d}Z"
    assert entry.trigger == RULE_CONTEXT
    assert entry.delivered is None and entry.outcome is None
    assert [step.step for step in entry.steps] == ["committed"]
    assert await buffer.journal_body("fact-1") == encode_event(made)


async def test_work_order_and_lot_find_every_event_of_theirs_oldest_first(buffer: Buffer) -> None:
    first = event(id="a", data={"work_order": "WO-1", "batch": "B-9"})
    second = event("operational", id="b", subject="WO-1")  # no data.work_order: the subject is the work order
    other = event(id="c", data={"work_order": "WO-2", "lot": "B-9"})
    await buffer.append([first, second, other])
    assert [entry.id for entry in await buffer.trace("WO-1")] == ["a", "b"]
    assert [entry.id for entry in await buffer.trace("B-9")] == ["a", "c"]
    assert [entry.lot for entry in await buffer.trace("B-9")] == ["B-9", "B-9"]
    assert [entry.id for entry in await buffer.trace("WO-1", limit=1)] == ["a"]
    assert await buffer.trace("nothing-known") == []
    found = await buffer.journal_entries(["c", "a", "missing"])
    assert sorted(found) == ["a", "c"]
    assert found["c"].work_order == "WO-2"


async def test_a_source_event_names_its_source_and_original_source(buffer: Buffer) -> None:
    await buffer.append([event(id="mes-1", originsource="urn:mes:plant-01", data={"work_order": "WO-1"})])
    (entry,) = await buffer.trace("mes-1")
    assert entry.trigger == {"source": "press7", "originsource": "urn:mes:plant-01"}


async def test_telemetry_is_never_journaled(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = await open_buffer(path)
    try:
        await buffer.append([event("telemetry", id="t-1"), event("telemetry", id="t-2")])
        assert await buffer.trace("t-1") == []
    finally:
        await buffer.close()
    assert journal_rows(path) == 0


async def test_a_dead_letter_made_before_any_sink_is_journaled_without_a_sequence(buffer: Buffer) -> None:
    made = event(id="bad-1", data={"work_order": "WO-5"})
    context = {"source": "press7", "rule": "r", "values": {}}
    dead = DeadLetter(
        id="bad-1", sink=NO_SINK, reason="mapping: unknown item", type=made.type, subject=None,
        lane="transaction", time=time.time(), body=encode_event(made),
        context=context,
    )
    await buffer.append([], dead_letters=[dead])
    (entry,) = await buffer.trace("WO-5")
    assert entry.id == "bad-1" and entry.seq is None
    assert entry.trigger == context
    assert [(step.step, step.sink, step.detail) for step in entry.steps] == [
        ("committed", None, None),
        ("dead_letter", None, "mapping: unknown item"),
    ]


async def test_the_window_lists_committed_entries_in_order_and_by_type(buffer: Buffer) -> None:
    start = time.time()
    await buffer.append([event(id="w-1"), event("operational", id="w-2")])
    await buffer.append([event(id="w-3", name="material.consumed")])
    end = time.time() + 1
    rows = await buffer.journal_window(start, end, by="committed")
    assert [row[0] for row in rows] == ["w-1", "w-2", "w-3"]
    assert rows[0][2:] == (None, None)
    only = await buffer.journal_window(start, end, "io.plantgate.material.consumed", by="committed")
    assert [row[0] for row in only] == ["w-3"]
    assert await buffer.journal_window(start, end) == []  # nothing delivered yet
    with pytest.raises(ValueError, match="by"):
        await buffer.journal_window(start, end, by="outcome")


async def test_a_group_split_into_several_transactions_journals_every_event(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = await open_buffer(path, max_rows_per_commit=7)
    try:
        made = [
            event(lane, id=f"g-{lane}-{n}") for n in range(40) for lane in ("transaction", "telemetry", "operational")
        ]
        await buffer.append(made)
        journaled = [e for e in made if e.lane != "telemetry"]
        entries = await buffer.journal_entries([e.id for e in made])
        assert sorted(entries) == sorted(e.id for e in journaled)
        assert [entries[e.id].seq for e in journaled] == [int(e.sequence or 0) for e in journaled]
    finally:
        await buffer.close()
    assert journal_rows(path) == 80  # the transactions and the operational events, never the telemetry


async def test_a_disabled_journal_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = await open_buffer(path, journal=False)
    try:
        made = event(data={"work_order": "WO-1"})
        dead = DeadLetter(
            id="dl", sink=NO_SINK, reason="r", type=made.type, subject=None, lane="transaction", time=time.time(),
            body=b"{}",
        )
        cursor = buffer.cursor("sink", ["transaction", "operational"])
        await buffer.append([made, event("operational")], dead_letters=[dead], contexts={made.id: RULE_CONTEXT})
        batch = await cursor.next_batch(10, wait=False)
        assert len(batch) == 2
        cursor.settle(batch, [ACKED] * len(batch))
        await buffer.commit_now()
        assert await buffer.trace("WO-1") == []
    finally:
        await buffer.close()
    for table in ("journal", "journal_steps", "journal_ranges"):
        assert journal_rows(path, table) == 0


class _Sequencing:
    type = "material.consumed"
    after = ["workorder.released"]
    hold = 3600.0


async def test_a_held_event_is_journaled_without_a_sequence_then_takes_one_when_released(tmp_path: Path) -> None:
    buffer = await open_buffer(tmp_path / "buffer.db", sequencing=[_Sequencing()])
    try:
        held = event(id="consumed-1", name="material.consumed", data={"work_order": "WO-9"})
        await buffer.append([held], contexts={"consumed-1": RULE_CONTEXT})
        (entry,) = await buffer.trace("consumed-1")
        assert entry.seq is None
        assert [step.step for step in entry.steps] == ["committed", "held"]
        await buffer.append([event(id="rel-1", name="workorder.released", data={"work_order": "WO-9"})])
        entries = {entry.id: entry for entry in await buffer.trace("WO-9")}
        assert entries["consumed-1"].seq is not None
        assert entries["consumed-1"].seq > (entries["rel-1"].seq or 0)
        assert entries["consumed-1"].trigger == RULE_CONTEXT
        assert [step.step for step in entries["consumed-1"].steps] == ["committed", "held", "released"]
    finally:
        await buffer.close()


async def test_a_file_from_before_the_journal_gains_it_at_open(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = await open_buffer(path)
    await buffer.append([event(id="old-1")])
    await buffer.close()
    with sqlite3.connect(path) as db:
        for table in ("journal_ranges", "journal_steps", "journal"):
            db.execute(f"DROP TABLE {table}")
    reader = Buffer(path)
    await reader.open(readonly=True)
    try:
        assert await reader.trace("old-1") == []
        assert await reader.journal_body("old-1") is None
    finally:
        await reader.close()
    buffer = await open_buffer(path)
    try:
        await buffer.append([event(id="new-1", data={"work_order": "WO-1"})])
        assert [entry.id for entry in await buffer.trace("WO-1")] == ["new-1"]
    finally:
        await buffer.close()
