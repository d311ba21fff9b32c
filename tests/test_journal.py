"""The delivery journal in the buffer file: what it records for each event, and how it is read back.

Everything runs against a real SQLite buffer file in ``tmp_path``; ``journal_rows``
peeks into the file with sqlite3 (read-only) where the observable is what is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent.config_types import BuildContext
from agent.events import CloudEvent, Lane, Sample, TelemetrySamples, decode_event, encode_event, make_event
from agent.sink import ACKED, Delivered, Rejected, RetryLater
from buffer import NO_SINK, Buffer, DeadLetter, JournalEntry, OutcomeCounts, OutcomeReport
from buffer.journal import COMPACT_RUNS, JOURNAL_TABLES, MERGE_EVERY, RANGE_SPAN
from buffer.segment import unpack_segment
from protocols.https import HttpsSinkConfig
from tests.peers.https_server import Certificates, HttpsReceiver
from tests.peers.waiting import wait_for

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
    """Rows of a journal table, read from the file itself (0 when the table does not exist); for
    ``journal``, the entries: the events of the journaled segments and the held entries."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        if table == "journal":
            return sum(
                len(journal_ids_of(blob)) for (blob,) in db.execute("SELECT events FROM journal_segments")
            ) + int(db.execute("SELECT count(*) FROM journal_held").fetchone()[0])
        exists = db.execute("SELECT count(*) FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
        return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]) if exists else 0


def journal_ids_of(blob: bytes) -> list[str]:
    """The ids of the events of one journaled segment."""
    return [event.id for event in unpack_segment(blob)]


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
        id="bad-1",
        sink=NO_SINK,
        reason="mapping: unknown item",
        type=made.type,
        subject=None,
        lane="transaction",
        time=time.time(),
        body=encode_event(made),
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
            id="dl",
            sink=NO_SINK,
            reason="r",
            type=made.type,
            subject=None,
            lane="transaction",
            time=time.time(),
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
        for table in JOURNAL_TABLES:
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


# --- delivery steps -----------------------------------------------------------------------------------------


def steps_of(entry: JournalEntry, *kinds: str) -> list[tuple[str, str | None, str | None, str | None]]:
    """``(step, sink, status, reference)`` of ``entry``'s steps (of ``kinds`` when given), in time order."""
    return [
        (step.step, step.sink, step.status, step.reference) for step in entry.steps if not kinds or step.step in kinds
    ]


async def test_attempts_and_acknowledgements_are_recorded_per_sink_and_delivered_is_the_first_ack(
    buffer: Buffer,
) -> None:
    erp = buffer.cursor("erp", ["transaction", "operational"])
    lake = buffer.cursor("lake", ["transaction"])
    made = [event(id=f"d-{n}", data={"work_order": "WO-D"}) for n in range(5)] + [event("operational", id="d-op")]
    await buffer.append(made)
    batch = await erp.next_batch(100, wait=False)
    erp.settle(batch, [RetryLater(reason="HTTP 503")] * len(batch))
    await buffer.commit_now()
    entries = {entry.id: entry for entry in await buffer.trace("WO-D")}
    assert all(entry.delivered is None for entry in entries.values())
    assert steps_of(entries["d-0"]) == [("committed", None, None, None), ("attempt", "erp", "HTTP 503", None)]

    before = time.time()
    batch = await erp.next_batch(100, wait=False)
    erp.settle(batch, [ACKED, ACKED, RetryLater(reason="timeout"), ACKED, ACKED, ACKED])
    await buffer.commit_now()
    first_acks = time.time()
    batch = await lake.next_batch(100, wait=False)
    lake.settle(batch, [ACKED] * len(batch))
    await buffer.commit_now()
    entries = {entry.id: entry for entry in await buffer.trace("WO-D")}
    assert steps_of(entries["d-0"], "attempt", "acked") == [
        ("attempt", "erp", "HTTP 503", None),
        ("acked", "erp", "ok", None),
        ("acked", "lake", "ok", None),
    ]
    assert steps_of(entries["d-2"], "attempt", "acked") == [
        ("attempt", "erp", "HTTP 503", None),
        ("attempt", "erp", "timeout", None),
        ("acked", "lake", "ok", None),
    ]
    # Delivered: the first acknowledgement by any sink (erp for most, the lake for d-2).
    for id_ in ("d-0", "d-1", "d-3", "d-4"):
        assert before <= (entries[id_].delivered or 0) <= first_acks
    assert (entries["d-2"].delivered or 0) >= first_acks
    (operational,) = await buffer.trace("d-op")
    assert steps_of(operational, "acked") == [("acked", "erp", "ok", None)]
    window = await buffer.journal_window(before, time.time() + 1)
    assert [row[0] for row in window] == ["d-0", "d-1", "d-3", "d-4", "d-op", "d-2"]


async def test_a_batch_whose_events_lie_far_apart_is_found_for_every_event(buffer: Buffer) -> None:
    cursor = buffer.cursor("erp", ["transaction"])
    made: list[CloudEvent] = []
    for n in range(30):
        made.append(event(id=f"far-{n}", data={"work_order": "WO-FAR"}))
        made.extend(event("telemetry") for _ in range(n * 7))  # ever wider gaps between the transactions
    await buffer.append(made)
    batch = await cursor.next_batch(100, wait=False)
    assert len(batch) == 30 and batch[-1].seq - batch[0].seq > 3 * RANGE_SPAN
    cursor.settle(batch, [ACKED] * len(batch))
    await buffer.commit_now()
    entries = await buffer.trace("WO-FAR")
    assert len(entries) == 30
    assert all(steps_of(entry, "acked") == [("acked", "erp", "ok", None)] for entry in entries)
    assert all(entry.delivered is not None for entry in entries)


async def test_a_receivers_reference_is_kept_per_event(buffer: Buffer) -> None:
    cursor = buffer.cursor("erp", ["transaction"])
    await buffer.append([event(id="r-1"), event(id="r-2"), event(id="r-3")])
    batch = await cursor.next_batch(10, wait=False)
    cursor.settle(batch, [Delivered(reference="ERP-1"), Delivered(), ACKED])
    await buffer.commit_now()
    found = await buffer.journal_entries(["r-1", "r-2", "r-3"])
    assert found["r-1"].reference == "ERP-1"
    assert steps_of(found["r-1"], "acked") == [("acked", "erp", "ok", "ERP-1")]
    assert found["r-2"].reference is None and steps_of(found["r-2"], "acked") == [("acked", "erp", "ok", None)]
    assert all(entry.delivered is not None for entry in found.values())
    assert cursor.depth() == 0  # Delivered counts as acknowledged


async def test_a_rejection_and_its_replay_are_steps_and_the_replay_gets_a_new_sequence(buffer: Buffer) -> None:
    cursor = buffer.cursor("erp", ["transaction"])
    await buffer.append([event(id="x-1", data={"work_order": "WO-X"})])
    batch = await cursor.next_batch(10, wait=False)
    first_seq = batch[0].seq
    cursor.settle(batch, [Rejected("HTTP 422: unknown plant")])
    await buffer.commit_now()
    (entry,) = await buffer.trace("x-1")
    assert entry.seq == first_seq
    assert [(s.step, s.sink, s.detail) for s in entry.steps if s.step == "dead_letter"] == [
        ("dead_letter", "erp", "HTTP 422: unknown plant")
    ]
    ((n, letter),) = await buffer.dead_letter_rows()
    await buffer.requeue([(n, decode_event(letter.body))])
    batch = await cursor.next_batch(10, wait=False)
    assert [e.id for e in batch] == ["x-1"] and batch[0].seq > first_seq
    cursor.settle(batch, [ACKED])
    await buffer.commit_now()
    (entry,) = await buffer.trace("WO-X")
    assert entry.seq == batch[0].seq
    assert [s.step for s in entry.steps] == ["committed", "dead_letter", "replayed", "acked"]
    assert entry.steps[2].detail == f"from dead letter {n}"
    assert entry.delivered is not None


async def test_a_resend_from_the_journal_goes_to_every_sink_of_its_lane_under_its_id(buffer: Buffer) -> None:
    erp = buffer.cursor("erp", ["transaction"])
    await buffer.append([event(id="lost-1", data={"work_order": "WO-L"})])
    batch = await erp.next_batch(10, wait=False)
    erp.settle(batch, [ACKED])
    await buffer.commit_now()
    body = await buffer.journal_body("lost-1")
    assert body is not None
    await buffer.requeue([(None, decode_event(body))])
    again = await erp.next_batch(10, wait=False)
    assert [e.id for e in again] == ["lost-1"] and again[0].seq > batch[0].seq
    assert buffer.dead_letter_count == 0
    (entry,) = await buffer.trace("lost-1")
    assert [(s.step, s.detail) for s in entry.steps][-1] == ("replayed", "resent from the journal")


class _ReferencingReceiver:
    """A real HTTPS receiver (hypercorn, trustme certificates) that answers with the ERP's references."""

    def __init__(self, style: str) -> None:
        self.style = style
        self.seen: list[str] = []

    async def events(self, request: Request) -> Response:
        if request.method == "OPTIONS":
            return Response(status_code=204)
        ids = [event["id"] for event in json.loads(await request.body())]
        self.seen.extend(ids)
        if self.style == "object":
            return JSONResponse({"references": {id_: f"ERP-{id_}" for id_ in ids[::2]}})
        if self.style == "list":
            return JSONResponse({"references": [{"id": id_, "reference": f"ERP-{id_}"} for id_ in ids[1::2]]})
        return JSONResponse({"accepted": len(ids)})


@pytest.mark.parametrize("style", ["object", "list", "none"])
async def test_the_https_sink_carries_the_receivers_references_into_the_journal(tmp_path: Path, style: str) -> None:
    certs = Certificates(tmp_path / "certs")
    peer = _ReferencingReceiver(style)
    receiver = HttpsReceiver(certs)
    receiver.app = Starlette(routes=[Route("/events", peer.events, methods=["POST", "OPTIONS"])])
    buffer = await open_buffer(tmp_path / "buffer.db")
    config = HttpsSinkConfig(name="erp", url=receiver.url, ca_file=certs.ca_file, timeout="5s")
    sink = config.build(BuildContext(agent_id="gw", site="plant-01", version="9", data_dir=tmp_path))
    try:
        with receiver:
            running = asyncio.create_task(sink.run())
            try:
                cursor = buffer.cursor("erp", ["transaction"])
                await buffer.append([event(id=f"h-{n}", data={"work_order": "WO-H"}) for n in range(6)])
                batch = await cursor.next_batch(10, wait=False)
                cursor.settle(batch, await sink.deliver(batch))
                await buffer.commit_now()
            finally:
                running.cancel()  # closes the sink's connections before the receiver stops
                with contextlib.suppress(asyncio.CancelledError):
                    await running
        assert peer.seen == [f"h-{n}" for n in range(6)]
        entries = {entry.id: entry for entry in await buffer.trace("WO-H")}
        referenced = {"object": [0, 2, 4], "list": [1, 3, 5], "none": []}[style]
        for n in range(6):
            entry = entries[f"h-{n}"]
            expected = f"ERP-h-{n}" if n in referenced else None
            assert entry.reference == expected
            assert steps_of(entry, "acked") == [("acked", "erp", "ok", expected)]
            assert entry.delivered is not None
    finally:
        await buffer.close()


# --- business outcomes --------------------------------------------------------------------------------------


async def delivered_events(buffer: Buffer, made: list[CloudEvent]) -> None:
    """Append ``made`` and have a sink acknowledge every one of them."""
    cursor = buffer.cursor("erp", ["transaction", "operational"])
    await buffer.append(made)
    batch = await cursor.next_batch(1000, wait=False)
    cursor.settle(batch, [ACKED] * len(batch))
    await buffer.commit_now()


async def test_outcomes_are_recorded_once_and_a_different_later_one_overrides(buffer: Buffer) -> None:
    await delivered_events(buffer, [event(id=f"o-{n}", data={"work_order": "WO-O"}) for n in range(3)])
    at = time.time()
    await buffer.record_outcomes(
        [
            OutcomeReport("o-0", "posted", reference="4711", at=at),
            OutcomeReport("o-1", "rejected", reason="period closed", at=at),
            OutcomeReport("unknown-id", "posted"),
        ]
    )
    found = await buffer.journal_entries(["o-0", "o-1", "o-2"])
    assert (found["o-0"].outcome, found["o-0"].reference, found["o-0"].outcome_at) == ("posted", "4711", at)
    assert (found["o-1"].outcome, found["o-1"].reason) == ("rejected", "period closed")
    assert found["o-2"].outcome is None
    assert [(s.step, s.reference, s.detail) for s in found["o-0"].steps if s.step == "posted"] == [
        ("posted", "4711", None)
    ]
    # The same report again changes nothing; a different one is a new step.
    await buffer.record_outcomes([OutcomeReport("o-0", "posted", reference="4711", at=at + 5)])
    await buffer.record_outcomes([OutcomeReport("o-1", "posted", reference="4712", at=at + 9)])
    found = await buffer.journal_entries(["o-0", "o-1"])
    assert [s.step for s in found["o-0"].steps].count("posted") == 1 and found["o-0"].outcome_at == at
    assert (found["o-1"].outcome, found["o-1"].reference, found["o-1"].reason) == ("posted", "4712", None)
    assert [s.step for s in found["o-1"].steps if s.step in ("posted", "rejected")] == ["rejected", "posted"]


async def test_the_outcome_summary_counts_per_type_and_stays_exact_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = await open_buffer(path)
    completed, consumed = "io.plantgate.production.completed", "io.plantgate.material.consumed"
    try:
        assert await buffer.outcome_summary() == {}
        await buffer.append([event(id="not-yet-delivered")])
        await delivered_events(buffer, [event(id=f"s-{n}") for n in range(5)])
        first_delivery = (await buffer.journal_entries(["s-0"]))["s-0"].delivered
        await delivered_events(buffer, [event(id=f"m-{n}", name="material.consumed") for n in range(2)])
        await buffer.record_outcomes(
            [
                OutcomeReport("s-0", "posted", reference="1"),
                OutcomeReport("s-1", "posted", reference="2"),
                OutcomeReport("s-2", "rejected", reason="no such storage location"),
                OutcomeReport("m-0", "posted"),
            ]
        )
        summary = await buffer.outcome_summary()
        assert summary[completed] == OutcomeCounts(
            unconfirmed=2, confirmed=2, rejected=1, oldest_unconfirmed=summary[completed].oldest_unconfirmed
        )
        assert summary[consumed].unconfirmed == 1 and summary[consumed].confirmed == 1
        oldest = summary[completed].oldest_unconfirmed
        assert oldest is not None and first_delivery is not None and oldest >= first_delivery
        assert oldest == (await buffer.journal_entries(["s-3"]))["s-3"].delivered
        # The rejected one is posted after a fix: it moves from rejected to confirmed.
        await buffer.record_outcomes([OutcomeReport("s-2", "posted", reference="3")])
        before_restart = await buffer.outcome_summary()
        assert before_restart[completed].rejected == 0 and before_restart[completed].confirmed == 3
    finally:
        await buffer.close()
    buffer = await open_buffer(path)
    try:
        assert await buffer.outcome_summary() == before_restart
        await buffer.record_outcomes(
            [OutcomeReport(f"s-{n}", "posted") for n in (3, 4)] + [OutcomeReport("m-1", "posted")]
        )
        summary = await buffer.outcome_summary()
        assert summary[completed] == OutcomeCounts(0, 5, 0, None)
        assert summary[consumed] == OutcomeCounts(0, 2, 0, None)
        await buffer.maintain()
        assert buffer.journal_stats()["entries"] == 8
    finally:
        await buffer.close()


async def test_journal_stats_show_entries_oldest_size_and_bounds(tmp_path: Path) -> None:
    buffer = await open_buffer(tmp_path / "buffer.db", journal_retention=3600, journal_max_size_mb=2)
    try:
        start = time.time()
        await buffer.append([event(id=f"st-{n}") for n in range(10)] + [event("telemetry")])
        await buffer.maintain()
        stats = buffer.journal_stats()
        assert stats["enabled"] is True and stats["entries"] == 10
        assert start <= stats["oldest_committed"] <= time.time()
        assert 10 * 150 < stats["bytes"] < 10 * 1500
        assert stats["max_bytes"] == 2 * 1024 * 1024 and stats["retention_seconds"] == 3600
        assert stats["trimmed"] == 0
    finally:
        await buffer.close()


# --- retention and size bound -------------------------------------------------------------------------------


async def trim_until_done(buffer: Buffer, rounds: int = 50) -> None:
    """Upkeep (as the agent runs it every second) until nothing is left to trim; bounded."""
    for _ in range(rounds):
        await buffer.maintain()
        await buffer.commit_now()
        await buffer.maintain()
        if not buffer._journal_trim_due:
            return
    raise AssertionError("the journal was still trimming after the bounded number of rounds")


async def test_a_record_outlives_its_buffer_row(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = await open_buffer(path)
    try:
        await delivered_events(buffer, [event(id="kept-1", data={"work_order": "WO-K"})])
        await trim_until_done(buffer)
    finally:
        await buffer.close()
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        assert db.execute("SELECT count(*) FROM lane_transaction").fetchone()[0] == 0  # delivered: gone
    buffer = await open_buffer(path)
    try:
        (entry,) = await buffer.trace("WO-K")
        assert entry.id == "kept-1" and entry.delivered is not None
        assert await buffer.journal_body("kept-1") is not None
    finally:
        await buffer.close()


async def test_entries_committed_after_a_failed_commit_are_found_under_their_own_ids(tmp_path: Path) -> None:
    """A commit that fails (full disk) and is retried journals its events once, found by id and work order."""
    path = tmp_path / "buffer.db"
    buffer = await open_buffer(path)
    buffer.commit_retry_interval = 0.05
    try:
        await buffer.append([event(id="first", data={"work_order": "WO-1"})])
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            pages = int(db.execute("PRAGMA page_count").fetchone()[0])
        await buffer.set_max_page_count(pages)  # the disk is full: the next commit fails and is retried
        big = [event(id=f"big-{n}", data={"work_order": "WO-2", "pad": secrets.token_hex(2000)}) for n in range(40)]
        future = buffer.append(big)
        await wait_for(lambda: buffer.refusing_writes is not None, message="the commit fails: disk full")
        await buffer.set_max_page_count(1 << 30)  # room again: the retry commits
        await asyncio.wait_for(future, 10)
        await buffer.append([event(id="after", data={"work_order": "WO-3"})])
        for key, ids in (("first", ["first"]), ("WO-2", [e.id for e in big]), ("after", ["after"])):
            assert [entry.id for entry in await buffer.trace(key)] == ids
        assert [entry.id for entry in (await buffer.journal_entries(["big-7", "after"])).values()] == ["big-7", "after"]
    finally:
        await buffer.close()
    buffer = await open_buffer(path)  # and from the file's own numbers after a restart
    try:
        assert [entry.id for entry in await buffer.trace("after")] == ["after"]
        assert [entry.id for entry in await buffer.trace("big-39")] == ["big-39"]
    finally:
        await buffer.close()


async def test_retention_trims_entries_their_steps_and_ranges_oldest_first(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = await open_buffer(path, journal_retention=3600)
    try:
        await delivered_events(buffer, [event(id=f"old-{n}", data={"work_order": "WO-OLD"}) for n in range(20)])
        await buffer.record_outcomes([OutcomeReport("old-0", "posted"), OutcomeReport("old-1", "rejected")])
        await trim_until_done(buffer)
        assert len(await buffer.trace("WO-OLD")) == 20  # within retention: kept
        buffer.journal_retention = 0.0  # now everything committed so far is past retention
        cutoff = time.time()
        await trim_until_done(buffer)
        buffer.journal_retention = time.time() - cutoff + 3600
        await delivered_events(buffer, [event(id="new-0", data={"work_order": "WO-NEW"})])
        await trim_until_done(buffer)
        assert await buffer.trace("WO-OLD") == []
        assert [entry.id for entry in await buffer.trace("WO-NEW")] == ["new-0"]
        assert await buffer.outcome_summary() == {
            "io.plantgate.production.completed": OutcomeCounts(1, 0, 0, (await buffer.trace("new-0"))[0].delivered)
        }
        stats = buffer.journal_stats()
        assert stats["entries"] == 1 and stats["trimmed"] == 20
    finally:
        await buffer.close()
    assert journal_rows(path, "journal") == 1
    assert journal_rows(path, "journal_steps") == 0  # the outcomes' steps went with their entries
    assert journal_rows(path, "journal_ranges") == 1  # the new entry's acknowledgement only
    buffer = await open_buffer(path)
    try:
        assert buffer.journal_stats()["trimmed"] == 20  # kept in the file
    finally:
        await buffer.close()


async def test_the_size_bound_trims_the_oldest_entries_first(tmp_path: Path) -> None:
    buffer = await open_buffer(tmp_path / "buffer.db", journal_max_size_mb=0.02)  # about 4 segments of 30
    try:
        for start in range(0, 300, 30):
            made = [event(id=f"b-{n}", data={"work_order": "WO-B"}) for n in range(start, start + 30)]
            await delivered_events(buffer, made)
            await trim_until_done(buffer)
            assert buffer.journal_stats()["bytes"] <= buffer.journal_max_bytes
        kept = [entry.id for entry in await buffer.trace("WO-B")]
        assert 20 <= len(kept) < 250
        assert kept == [f"b-{n}" for n in range(300 - len(kept), 300)]  # the newest, in order
        assert buffer.journal_stats()["trimmed"] == 300 - len(kept)
    finally:
        await buffer.close()


async def test_the_journal_never_makes_the_buffer_full(tmp_path: Path) -> None:
    buffer = await open_buffer(tmp_path / "buffer.db", max_size_mb=0.25)
    try:
        for start in range(0, 3000, 500):
            made = [event(id=f"f-{n}", data={"pad": secrets.token_hex(200)}) for n in range(start, start + 500)]
            await delivered_events(buffer, made)
            await buffer.maintain()
            assert buffer.refusing_writes is None
        assert buffer.file_bytes > 3 * buffer.max_size_bytes  # the journal's 3,000 entries are in the file ...
        assert buffer.size_bytes < buffer.max_size_bytes  # ... and not in the buffer's share
    finally:
        await buffer.close()


async def test_ids_are_found_before_and_after_their_index_is_merged_and_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = await open_buffer(path)
    total = MERGE_EVERY + MERGE_EVERY // 2
    try:
        for start in range(0, total, 5000):
            made = [
                event(id=f"m-{n}", data={"work_order": f"WO-M{n % 7}"}) for n in range(start, min(start + 5000, total))
            ]
            await buffer.append(made)
        probes = [f"m-{n}" for n in (0, 1, MERGE_EVERY - 1, MERGE_EVERY, total - 1)]
        for id_ in probes:
            assert [entry.id for entry in await buffer.trace(id_)] == [id_]
        found = await buffer.journal_entries([*probes, "m-missing"])
        assert sorted(found) == sorted(probes)
        many = [f"m-{n}" for n in range(0, total, 53)]  # a large batch reads the key runs whole
        assert sorted(await buffer.journal_entries([*many, "m-missing"])) == sorted(many)
        assert await buffer.journal_body(f"m-{MERGE_EVERY}") is not None
    finally:
        await buffer.close()
    reader = Buffer(path)
    await reader.open(readonly=True)
    try:
        assert [entry.id for entry in await reader.trace(f"m-{total - 1}")] == [f"m-{total - 1}"]
        assert len(await reader.trace("WO-M3", limit=20_000)) == len(range(3, total, 7))
    finally:
        await reader.close()


async def test_an_index_of_ids_hashed_another_way_is_made_again(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = await open_buffer(path)
    try:
        await buffer.append([event(id=f"h2-{n}") for n in range(50)])
        await buffer.maintain()  # the first upkeep merges the new ids into their index
        await buffer.commit_now()
    finally:
        await buffer.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM journal_keys").fetchone()[0] == 1  # one run
        db.execute("UPDATE journal_keys SET keys = zeroblob(length(keys))")  # as another hash would have made them
        db.execute("UPDATE meta SET value = 'another' WHERE key = 'journal_key_hash'")
    buffer = await open_buffer(path)
    try:
        assert [entry.id for entry in await buffer.trace("h2-7")] == ["h2-7"]
        await buffer.maintain()
        await buffer.commit_now()
        assert [entry.id for entry in await buffer.trace("h2-49")] == ["h2-49"]
    finally:
        await buffer.close()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM journal_keys").fetchone()[0] == 1
        (keys,) = db.execute("SELECT keys FROM journal_keys").fetchone()
        assert len(keys) == 8 * 50 and any(keys)  # the 50 ids, hashed this way


async def test_a_journal_of_an_earlier_layout_is_started_afresh(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = await open_buffer(path)
    buffer.cursor("cloud", ["transaction"])
    await buffer.append([event(id="kept-in-lane")])
    await buffer.close()
    with sqlite3.connect(path) as db:
        # The layout of a row per event: an entries table beside segments without keys.
        db.execute("DROP TABLE journal_segments")
        db.execute("CREATE TABLE journal_segments (first_seq INTEGER PRIMARY KEY, last_seq INTEGER, events BLOB)")
        db.execute("CREATE TABLE journal (n INTEGER PRIMARY KEY, id TEXT NOT NULL, type TEXT, seq INTEGER)")
        db.execute("INSERT INTO journal(id, type, seq) VALUES ('old-layout', 'io.plantgate.production.completed', 1)")
    buffer = await open_buffer(path)
    try:
        cursor = buffer.cursor("cloud", ["transaction"])
        await buffer.append([event(id="new-layout", data={"work_order": "WO-N"})])
        # The buffer itself is untouched: the event appended before is still there for its sink.
        assert [e.id for e in await cursor.next_batch(10, wait=False)] == ["kept-in-lane", "new-layout"]
        assert [entry.id for entry in await buffer.trace("WO-N")] == ["new-layout"]
        assert await buffer.trace("old-layout") == []
    finally:
        await buffer.close()


async def test_ids_of_any_width_and_form_are_found_by_id_and_by_work_order(buffer: Buffer) -> None:
    """Ids of one width are read from their stored form by position; others, one with a newline too, by list."""
    same = [event(id=f"w-{n:04d}", data={"work_order": "WO-W", "lot": "L-1"}) for n in range(30)]
    mixed = [event(id="x" * n, data={"work_order": "WO-X"}) for n in range(1, 20)]
    odd = [event(id="line\nbreak", data={"work_order": "WO-Y"}), event(id="after-it", data={"work_order": "WO-Y"})]
    for group in (same, mixed, odd):
        await buffer.append(group)
    for key, made in (("WO-W", same), ("WO-X", mixed), ("WO-Y", odd)):
        assert [entry.id for entry in await buffer.trace(key)] == [e.id for e in made]
    assert [entry.id for entry in await buffer.trace("L-1")] == [e.id for e in same]
    for made in (same[7], mixed[11], odd[0], odd[1]):
        (entry,) = await buffer.trace(made.id)
        assert entry.id == made.id and entry.seq == int(made.sequence or 0)
        assert await buffer.journal_body(made.id) is not None


async def test_segments_with_their_keys_after_their_events_are_started_afresh(tmp_path: Path) -> None:
    """A lookup reads only the keys: a layout that put them after the events' blob is replaced at open."""
    path = tmp_path / "buffer.db"
    buffer = await open_buffer(path)
    await buffer.close()
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE journal_segments")
        db.execute(
            "CREATE TABLE journal_segments (first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL, "
            "lane TEXT NOT NULL, committed REAL NOT NULL, events BLOB NOT NULL, keys BLOB NOT NULL)"
        )
    buffer = await open_buffer(path)
    try:
        await buffer.append([event(id="fresh-1", data={"work_order": "WO-F"})])
        assert [entry.id for entry in await buffer.trace("WO-F")] == ["fresh-1"]
    finally:
        await buffer.close()
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(journal_segments)")]
    assert columns.index("keys") < columns.index("events")


async def test_key_runs_are_compacted_and_every_id_is_still_found(tmp_path: Path) -> None:
    """Eight merge runs become one of the next level: a lookup reads fewer runs and finds the same."""
    path = tmp_path / "buffer.db"
    buffer = await open_buffer(path)
    total = (COMPACT_RUNS + 1) * MERGE_EVERY
    try:
        for start in range(0, total, 1000):
            made = [event(id=f"k-{n}", data={"work_order": f"WO-K{n % 3}"}) for n in range(start, start + 1000)]
            await buffer.append(made)
        probes = [f"k-{n}" for n in range(0, total, 997)]
        found = await buffer.journal_entries([*probes, "k-missing"])
        assert sorted(found) == sorted(probes)
        for probe in (probes[0], probes[len(probes) // 2], probes[-1]):
            assert [entry.id for entry in await buffer.trace(probe)] == [probe]
        assert len(await buffer.trace("WO-K1", limit=100_000)) == len(range(1, total, 3))
    finally:
        await buffer.close()
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        levels = [int(row[0]) for row in db.execute("SELECT level FROM journal_key_runs ORDER BY run")]
    assert 1 in levels and len(levels) < COMPACT_RUNS + 1
