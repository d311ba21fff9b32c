"""The delivery journal: what happened to every transaction and operational event, kept after delivery.

It lives in the buffer's SQLite file, in its own tables, and is written in the same
transaction as the group commit that stores the events (so it survives ``kill -9``
exactly as they do, at the cost of one ``executemany`` per commit):

- ``journal``: one row per event id (type, lane, current sequence, commit time,
  source, subject, work order, lot, what triggered it, the first acknowledgement,
  the business outcome, and the encoded CloudEvent so it can be replayed under the
  same id after its buffer row is gone);
- ``journal_steps``: what happened to one event (a dead letter, a replay, a hold
  and its release, a receiver's reference, a business outcome);
- ``journal_ranges``: what happened to a whole batch: one row per batch, sink,
  lane and step (``attempt``, ``acked``) covering a run of sequences of that lane.

A range never spans more than ``RANGE_SPAN`` sequences (a batch whose events are
further apart is cut into several rows), so the ranges covering one sequence are
found by an index probe over at most that many starting sequences.

This module holds the shapes, the schema and the reads; ``buffer.store`` queues the
writes with its group commit.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiosqlite
import msgspec

from agent.events import decode_event

RANGE_SPAN = 64
"""The widest run of sequences one ``journal_ranges`` row covers (see the module docstring)."""

JOURNAL_SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    n INTEGER PRIMARY KEY, id TEXT NOT NULL, type TEXT NOT NULL, lane TEXT NOT NULL, seq INTEGER,
    committed REAL NOT NULL, source TEXT NOT NULL, subject TEXT, work_order TEXT, lot TEXT, trigger TEXT,
    delivered REAL, outcome TEXT, outcome_at REAL, reference TEXT, reason TEXT, body BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS journal_id ON journal(id);
CREATE INDEX IF NOT EXISTS journal_seq ON journal(seq) WHERE seq IS NOT NULL;
CREATE INDEX IF NOT EXISTS journal_work_order ON journal(work_order) WHERE work_order IS NOT NULL;
CREATE INDEX IF NOT EXISTS journal_lot ON journal(lot) WHERE lot IS NOT NULL;
CREATE INDEX IF NOT EXISTS journal_committed ON journal(committed);
CREATE INDEX IF NOT EXISTS journal_delivered ON journal(delivered) WHERE delivered IS NOT NULL;
CREATE INDEX IF NOT EXISTS journal_unconfirmed ON journal(type, delivered)
    WHERE delivered IS NOT NULL AND outcome IS NULL;
CREATE INDEX IF NOT EXISTS journal_outcome ON journal(type, outcome) WHERE outcome IS NOT NULL;
CREATE TABLE IF NOT EXISTS journal_steps (
    n INTEGER PRIMARY KEY, id TEXT NOT NULL, at REAL NOT NULL, step TEXT NOT NULL, sink TEXT, status TEXT,
    reference TEXT, detail TEXT
);
CREATE INDEX IF NOT EXISTS journal_steps_id ON journal_steps(id);
CREATE TABLE IF NOT EXISTS journal_ranges (
    n INTEGER PRIMARY KEY, lane TEXT NOT NULL, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    at REAL NOT NULL, step TEXT NOT NULL, sink TEXT NOT NULL, status TEXT
);
CREATE INDEX IF NOT EXISTS journal_ranges_seq ON journal_ranges(lane, first_seq);
"""

JOURNAL_TABLES = ("journal", "journal_steps", "journal_ranges")

# An event's row: written with the segment that stores it. A second row for the same id (a replay,
# a held event released, the same fact again after the dedupe window) takes the new sequence and body.
INSERT_ENTRY = (
    "INSERT INTO journal(id, type, lane, seq, committed, source, subject, work_order, lot, trigger, body) "
    "VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET seq=excluded.seq, body=excluded.body"
)
# A row known before it has a sequence (held, a dead letter made before any sink): never overwrites.
INSERT_UNSEQUENCED = (
    "INSERT INTO journal(id, type, lane, seq, committed, source, subject, work_order, lot, trigger, body) "
    "VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO NOTHING"
)
INSERT_STEP = "INSERT INTO journal_steps(id, at, step, sink, status, reference, detail) VALUES (?,?,?,?,?,?,?)"
INSERT_RANGE = "INSERT INTO journal_ranges(lane, first_seq, last_seq, at, step, sink, status) VALUES (?,?,?,?,?,?,?)"

EntryRow = tuple[str, str, str, int | None, float, str, str | None, str | None, str | None, str | None, bytes]
"""(id, type, lane, seq, committed, source, subject, work order, lot, trigger JSON, body)."""
StepRow = tuple[str, float, str, str | None, str | None, str | None, str | None]
"""(id, at, step, sink, status, reference, detail)."""
RangeRow = tuple[str, int, int, float, str, str, str | None]
"""(lane, first seq, last seq, at, step, sink, status)."""


# What one row costs in the file beyond its variable-length values: the row's other columns and its
# index entries (calibrated against SQLite's dbstat on a filled journal; see tests/test_journal.py).
ENTRY_OVERHEAD = 160
STEP_OVERHEAD = 70
RANGE_BYTES = 70
DELIVERED_OVERHEAD = 40  # plus the type: a first delivery adds the entry to two indexes (window, unconfirmed)


def entry_bytes(rows: Sequence[EntryRow]) -> int:
    """The estimated bytes ``rows`` take in the file (values, their index keys, and per-row overhead)."""
    total = ENTRY_OVERHEAD * len(rows)
    for row in rows:
        total += 2 * len(row[0]) + len(row[1]) + len(row[5]) + len(row[10])
        if row[9] is not None:
            total += len(row[9])
        if row[7] is not None:
            total += 2 * len(row[7])
        if row[8] is not None:
            total += 2 * len(row[8])
    return total


def step_bytes(rows: Sequence[StepRow]) -> int:
    """The estimated bytes of per-event step rows."""
    return sum(STEP_OVERHEAD + 2 * len(row[0]) + len(row[6] or "") + len(row[5] or "") for row in rows)


class JournalStep(msgspec.Struct, omit_defaults=True):
    """One thing that happened to an event, in time order within its ``JournalEntry``."""

    at: float  # Unix time
    step: str  # committed | held | released | attempt | acked | dead_letter | replayed | posted | rejected
    sink: str | None = None
    status: str | None = None  # attempt: "HTTP 503" / "timeout" / "disconnected"; acked: "ok"
    reference: str | None = None  # the receiver's or the ERP's reference
    detail: str | None = None  # dead letter / rejection reason, replay origin, ...


class JournalEntry(msgspec.Struct, omit_defaults=True):
    """What the journal knows about one event: where it came from and everything that happened to it."""

    id: str
    type: str  # full CloudEvents type
    lane: str
    seq: int | None  # current sequence in the buffer (None: held, or a pre-sink dead letter)
    committed: float  # Unix time of the commit
    source: str  # CloudEvents source URI
    subject: str | None = None
    work_order: str | None = None
    lot: str | None = None
    source_time: str | None = None  # the event's ``time``
    trigger: dict[str, Any] | None = None  # what made it: a rule's context, or the source it came from
    delivered: float | None = None  # first acknowledgement by any sink
    outcome: str | None = None  # "posted" | "rejected" (business outcome)
    outcome_at: float | None = None
    reference: str | None = None  # the ERP's reference (posted) or the receiver's
    reason: str | None = None  # the ERP's reason (rejected)
    steps: list[JournalStep] = []


class OutcomeReport(msgspec.Struct, frozen=True):
    """What the ERP did with an event, as the middleware reports it (``POST /v1/outcomes``)."""

    id: str
    outcome: Literal["posted", "rejected"]
    reference: str | None = None
    reason: str | None = None
    at: float = 0.0  # when it was reported (Unix time); 0 = now


class OutcomeCounts(msgspec.Struct):
    """Per event type: delivered but not yet confirmed, confirmed (posted), rejected."""

    unconfirmed: int = 0
    confirmed: int = 0
    rejected: int = 0
    oldest_unconfirmed: float | None = None  # Unix time of the oldest ``delivered`` without an outcome


def journal_keys(data: Any, subject: str | None) -> tuple[str | None, str | None]:
    """The work order (``data.work_order``, else ``subject``) and lot (``data.lot``, else ``data.batch``)."""
    if isinstance(data, dict):
        work_order = data.get("work_order")
        lot = data.get("lot")
        if lot is None or lot == "":
            lot = data.get("batch")
    else:
        work_order = getattr(data, "work_order", None)
        lot = getattr(data, "lot", None)
        if lot is None or lot == "":
            lot = getattr(data, "batch", None)
    if work_order is None or work_order == "":
        work_order = subject or None
    elif not isinstance(work_order, str):
        work_order = str(work_order)
    if lot == "":
        lot = None
    elif lot is not None and not isinstance(lot, str):
        lot = str(lot)
    return work_order, lot


_trigger_encoder = msgspec.json.Encoder(decimal_format="string")


def trigger_text(trigger: dict[str, Any] | None) -> str | None:
    """A trigger context as stored (JSON), None for none."""
    return None if trigger is None else _trigger_encoder.encode(trigger).decode()


def source_trigger(source: str, originsource: str | None) -> dict[str, Any]:
    """The trigger of an event a source made itself (no rule): the source's name and the original source."""
    trigger: dict[str, Any] = {"source": source.rsplit("/", 1)[-1]}
    if originsource:
        trigger["originsource"] = originsource
    return trigger


def row_of(
    event: dict[str, Any], lane: str, seq: int | None, body: bytes, committed: float, trigger: dict[str, Any] | None
) -> EntryRow:
    """The entry of a decoded event (held, released, replayed): its keys read from the event itself."""
    source = event.get("source")
    subject = event.get("subject")
    work_order, lot = journal_keys(event.get("data"), subject)
    return (
        str(event.get("id", "")),
        str(event.get("type", "")),
        lane,
        seq,
        committed,
        source if isinstance(source, str) else "",
        subject if isinstance(subject, str) else None,
        work_order,
        lot,
        trigger_text(trigger),
        body,
    )


def unsequenced_row(
    event_id: str, type_: str, lane: str, body: bytes, committed: float, trigger: dict[str, Any] | None = None
) -> EntryRow:
    """The entry of an event known only by its encoded body (a dead letter made before any sink)."""
    try:
        event = decode_event(body)
    except msgspec.DecodeError:
        event = {}
    if not isinstance(event, dict):
        event = {}
    return row_of({**event, "id": event_id, "type": type_}, lane, None, body, committed, trigger)


class OutcomeTally:
    """Per type: delivered without an outcome, posted, rejected, and the oldest unconfirmed delivery.

    Kept in memory (``/metrics`` reads it on every scrape), loaded from the journal's
    partial indexes at open and changed only by what a commit made durable.
    """

    def __init__(self) -> None:
        self.counts: dict[str, OutcomeCounts] = {}

    def of(self, type_: str) -> OutcomeCounts:
        counts = self.counts.get(type_)
        if counts is None:
            counts = self.counts[type_] = OutcomeCounts()
        return counts

    async def load(self, db: aiosqlite.Connection) -> None:
        """The counts from the file (index scans, no table scan)."""
        self.counts = {}
        query = (
            "SELECT type, count(*), min(delivered) FROM journal "
            "WHERE delivered IS NOT NULL AND outcome IS NULL GROUP BY type"
        )
        async with db.execute(query) as cur:
            for type_, count, oldest in await cur.fetchall():
                counts = self.of(str(type_))
                counts.unconfirmed, counts.oldest_unconfirmed = int(count), oldest
        query = "SELECT type, outcome, count(*) FROM journal WHERE outcome IS NOT NULL GROUP BY type, outcome"
        async with db.execute(query) as cur:
            for type_, outcome, count in await cur.fetchall():
                counts = self.of(str(type_))
                if outcome == "posted":
                    counts.confirmed = int(count)
                elif outcome == "rejected":
                    counts.rejected = int(count)

    def apply(self, changes: TallyChanges) -> None:
        """What a commit changed (only after it committed)."""
        for type_, (unconfirmed, confirmed, rejected) in changes.deltas.items():
            counts = self.of(type_)
            counts.unconfirmed = max(0, counts.unconfirmed + unconfirmed)
            counts.confirmed = max(0, counts.confirmed + confirmed)
            counts.rejected = max(0, counts.rejected + rejected)
        for type_, oldest in changes.oldest.items():
            counts = self.of(type_)
            counts.oldest_unconfirmed = oldest if counts.unconfirmed else None
        for type_, at in changes.delivered_at.items():
            counts = self.of(type_)
            if counts.oldest_unconfirmed is None or at < counts.oldest_unconfirmed:
                counts.oldest_unconfirmed = at


@dataclass
class TallyChanges:
    """The outcome counts one transaction changes, applied to ``OutcomeTally`` once it committed."""

    deltas: dict[str, list[int]] = field(default_factory=dict)  # type -> [unconfirmed, confirmed, rejected]
    oldest: dict[str, float | None] = field(default_factory=dict)  # type -> recomputed oldest unconfirmed
    delivered_at: dict[str, float] = field(default_factory=dict)  # type -> earliest new first delivery
    recount: set[str] = field(default_factory=set)  # types whose oldest unconfirmed may have left
    bytes: int = 0  # estimated bytes the indexes grew by (first deliveries)

    def add(self, type_: str, unconfirmed: int = 0, confirmed: int = 0, rejected: int = 0) -> None:
        delta = self.deltas.get(type_)
        if delta is None:
            delta = self.deltas[type_] = [0, 0, 0]
        delta[0] += unconfirmed
        delta[1] += confirmed
        delta[2] += rejected

    def count_outcome(self, type_: str, outcome: str | None, sign: int) -> None:
        if outcome == "posted":
            self.add(type_, confirmed=sign)
        elif outcome == "rejected":
            self.add(type_, rejected=sign)

    async def settle_oldest(self, db: aiosqlite.Connection) -> None:
        """The oldest unconfirmed delivery of each type that lost one (an index seek each)."""
        query = "SELECT min(delivered) FROM journal WHERE type = ? AND delivered IS NOT NULL AND outcome IS NULL"
        for type_ in self.recount:
            async with db.execute(query, (type_,)) as cur:
                row = await cur.fetchone()
            self.oldest[type_] = None if row is None else row[0]
            self.delivered_at.pop(type_, None)


async def write_delivered(db: aiosqlite.Connection, writes: JournalWrites, changes: TallyChanges) -> None:
    """The first acknowledgement by any sink: one range UPDATE per batch and lane, on the seq index."""
    for at, lane, first, last in writes.delivered:
        async with db.execute(
            "UPDATE journal SET delivered = ? WHERE seq BETWEEN ? AND ? AND lane = ? AND delivered IS NULL "
            "RETURNING type, outcome",
            (at, first, last, lane),
        ) as cur:
            for type_, outcome in await cur.fetchall():
                changes.bytes += DELIVERED_OVERHEAD + len(type_)
                if outcome is None:
                    changes.add(type_, unconfirmed=1)
                    if type_ not in changes.delivered_at:
                        changes.delivered_at[type_] = at


async def write_outcomes(db: aiosqlite.Connection, reports: Sequence[OutcomeReport], changes: TallyChanges) -> None:
    """Business outcomes: the entry's outcome columns and a step, unless the same was reported already."""
    known: dict[str, list[Any]] = {}
    ids = list(dict.fromkeys(report.id for report in reports))
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        query = f"SELECT id, type, delivered, outcome, reference, reason FROM journal WHERE id IN ({marks})"
        async with db.execute(query, chunk) as cur:
            for id_, *rest in await cur.fetchall():
                known[id_] = rest
    updates: list[tuple[str, float, str | None, str | None, str]] = []
    steps: list[StepRow] = []
    for report in reports:
        row = known.get(report.id)
        if row is None:
            continue  # unknown here (trimmed, or never journaled): nothing to record
        type_, delivered, outcome, reference, reason = row
        new_reference = report.reference if report.reference is not None else reference
        if outcome == report.outcome and new_reference == reference and reason == report.reason:
            continue  # the same report again
        at = now_or(report.at)
        if outcome is None:
            if delivered is not None:
                changes.add(type_, unconfirmed=-1)
                changes.recount.add(type_)
        else:
            changes.count_outcome(type_, outcome, -1)
        changes.count_outcome(type_, report.outcome, 1)
        row[2:] = [report.outcome, new_reference, report.reason]
        updates.append((report.outcome, at, new_reference, report.reason, report.id))
        steps.append((report.id, at, report.outcome, None, None, report.reference, report.reason))
    if updates:
        await db.executemany(
            "UPDATE journal SET outcome = ?, outcome_at = ?, reference = ?, reason = ? WHERE id = ?", updates
        )
        await db.executemany(INSERT_STEP, steps)


@dataclass
class JournalWrites:
    """Journal rows waiting for the next group commit (beside the segments they describe)."""

    entries: dict[str, list[EntryRow]] = field(default_factory=lambda: {"transaction": [], "operational": []})
    """Per lane, one row per event appended to that lane, in the same order as the lane's rows."""
    unsequenced: list[EntryRow] = field(default_factory=list)
    steps: list[StepRow] = field(default_factory=list)
    ranges: list[RangeRow] = field(default_factory=list)
    delivered: list[tuple[float, str, int, int]] = field(default_factory=list)  # (at, lane, first seq, last seq)
    outcomes: list[OutcomeReport] = field(default_factory=list)
    references: list[tuple[str, str]] = field(default_factory=list)  # (a receiver's reference, id)

    def absorb(self, newer: JournalWrites) -> None:
        """Take ``newer``'s rows behind this one's, in order."""
        for lane, rows in newer.entries.items():
            self.entries[lane].extend(rows)
        self.unsequenced.extend(newer.unsequenced)
        self.steps.extend(newer.steps)
        self.ranges.extend(newer.ranges)
        self.delivered.extend(newer.delivered)
        self.references.extend(newer.references)
        self.outcomes.extend(newer.outcomes)


async def write_extras(db: aiosqlite.Connection, writes: JournalWrites) -> int:
    """Everything but the sequenced entries (those go with their segments): one ``executemany`` each.

    Returns the estimated bytes added.
    """
    added = 0
    if writes.unsequenced:
        await db.executemany(INSERT_UNSEQUENCED, writes.unsequenced)
        added += entry_bytes(writes.unsequenced)
    if writes.steps:
        await db.executemany(INSERT_STEP, writes.steps)
        added += step_bytes(writes.steps)
    if writes.ranges:
        await db.executemany(INSERT_RANGE, writes.ranges)
        added += RANGE_BYTES * len(writes.ranges)
    if writes.references:
        # The first receiver's reference is the entry's own until the ERP reports its own.
        await db.executemany("UPDATE journal SET reference = ? WHERE id = ? AND reference IS NULL", writes.references)
    return added


# --- trimming ----------------------------------------------------------------------------------

TRIM_CHUNK = 5000
"""Entries trimmed at most per transaction: the writer is held for tens of milliseconds, not seconds."""

_ENTRY_SIZE = (
    f"{ENTRY_OVERHEAD} + 2 * length(id) + length(type) + length(source) + length(body) "
    "+ coalesce(length(trigger), 0) + 2 * coalesce(length(work_order), 0) + 2 * coalesce(length(lot), 0) "
    f"+ CASE WHEN delivered IS NULL THEN 0 ELSE {DELIVERED_OVERHEAD} + length(type) END"
)


@dataclass
class Trimmed:
    """What one trim did: entries removed, estimated bytes freed, and whether more is due."""

    entries: int = 0
    bytes: int = 0
    more: bool = False


async def trim(
    db: aiosqlite.Connection, older_than: float, excess_bytes: int, changes: TallyChanges
) -> Trimmed:
    """Delete the oldest entries (with their steps and ranges) committed before ``older_than``, or while
    ``excess_bytes`` remain to be freed: at most ``TRIM_CHUNK``, oldest first (by row number)."""
    done = Trimmed()
    async with db.execute(f"SELECT n, committed, {_ENTRY_SIZE} FROM journal ORDER BY n LIMIT ?", (TRIM_CHUNK,)) as cur:
        rows = list(await cur.fetchall())
    last_n: int | None = None
    for n, committed, size in rows:
        if committed >= older_than and excess_bytes <= 0:
            break
        last_n = int(n)
        excess_bytes -= int(size)
        done.bytes += int(size)
        done.entries += 1
    if last_n is None:
        return done
    done.more = done.entries == len(rows) == TRIM_CHUNK
    ids: list[str] = []
    async with db.execute("DELETE FROM journal WHERE n <= ? RETURNING id, type, delivered, outcome", (last_n,)) as cur:
        for id_, type_, delivered, outcome in await cur.fetchall():
            ids.append(id_)
            if outcome is not None:
                changes.count_outcome(type_, outcome, -1)
            elif delivered is not None:
                changes.add(type_, unconfirmed=-1)
                changes.recount.add(type_)
    async with db.execute(
        "DELETE FROM journal_steps WHERE id IN (SELECT value FROM json_each(?)) "
        f"RETURNING {STEP_OVERHEAD} + 2 * length(id) + coalesce(length(detail), 0) + coalesce(length(reference), 0)",
        (msgspec.json.encode(ids).decode(),),
    ) as cur:
        done.bytes += sum(int(size) for (size,) in await cur.fetchall())
    # A range was recorded after the events it covers were committed: one recorded before the oldest
    # entry left was committed covers trimmed entries only. Ranges are in time order by row number.
    async with db.execute("SELECT committed FROM journal ORDER BY n LIMIT 1") as cur:
        row = await cur.fetchone()
    oldest_left = float(row[0]) if row is not None else float("inf")
    async with db.execute("SELECT n, at FROM journal_ranges ORDER BY n LIMIT ?", (4 * TRIM_CHUNK,)) as cur:
        ranges = list(await cur.fetchall())
    last_range: int | None = None
    for n, at in ranges:
        if at >= oldest_left:
            break
        last_range = int(n)
    if last_range is not None:
        async with db.execute("DELETE FROM journal_ranges WHERE n <= ? RETURNING 1", (last_range,)) as cur:
            done.bytes += RANGE_BYTES * len(list(await cur.fetchall()))
        done.more = done.more or last_range == int(ranges[-1][0])
    return done


# --- reads --------------------------------------------------------------------------------------

_ENTRY_COLUMNS = (
    "id, type, lane, seq, committed, source, subject, work_order, lot, trigger, delivered, outcome, outcome_at, "
    "reference, reason, body"
)


async def has_journal(db: aiosqlite.Connection) -> bool:
    """Whether the file has the journal's tables (a file from before the journal, opened read-only, has not)."""
    async with db.execute("SELECT count(*) FROM sqlite_master WHERE type='table' AND name LIKE 'journal%'") as cur:
        row = await cur.fetchone()
    return row is not None and int(row[0]) >= len(JOURNAL_TABLES)


def _trigger_of(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return None
    return value if isinstance(value, dict) else None


def _entry_of(row: Sequence[Any]) -> JournalEntry:
    (id_, type_, lane, seq, committed, source, subject, work_order, lot, trigger, delivered, outcome, outcome_at,
     reference, reason, body) = row
    source_time: str | None = None
    stored = _trigger_of(trigger)
    try:
        event = decode_event(body)
    except msgspec.DecodeError:
        event = {}
    if isinstance(event, dict):
        value = event.get("time")
        source_time = value if isinstance(value, str) else None
        if stored is None and source:
            # An event a source made itself: not stored per event (the hot path), read back from the event.
            origin = event.get("originsource")
            stored = source_trigger(source, origin if isinstance(origin, str) else None)
    return JournalEntry(
        id=id_,
        type=type_,
        lane=lane,
        seq=None if seq is None else int(seq),
        committed=float(committed),
        source=source,
        subject=subject,
        work_order=work_order,
        lot=lot,
        source_time=source_time,
        trigger=stored,
        delivered=delivered,
        outcome=outcome,
        outcome_at=outcome_at,
        reference=reference,
        reason=reason,
        steps=[JournalStep(at=float(committed), step="committed")],
    )


async def _with_steps(
    db: aiosqlite.Connection, entries: list[JournalEntry], where: str, params: tuple[Any, ...]
) -> None:
    """Add the per-event steps and the batch ranges to ``entries`` (chosen by ``where`` on the journal)."""
    by_id = {entry.id: entry for entry in entries}
    query = (
        "SELECT s.id, s.at, s.step, s.sink, s.status, s.reference, s.detail FROM journal_steps s "
        f"WHERE s.id IN (SELECT j.id FROM journal j WHERE {where}) ORDER BY s.n"
    )
    async with db.execute(query, params) as cur:
        async for id_, at, step, sink, status, reference, detail in cur:
            entry = by_id.get(id_)
            if entry is not None:
                entry.steps.append(JournalStep(float(at), step, sink, status, reference, detail))
    # Ranges: an index probe per entry over the few ranges that may start within RANGE_SPAN before it.
    query = (
        "SELECT j.id, r.at, r.step, r.sink, r.status FROM journal j JOIN journal_ranges r "
        "ON r.lane = j.lane AND r.first_seq BETWEEN j.seq - ? AND j.seq AND r.last_seq >= j.seq "
        f"WHERE ({where}) AND j.seq IS NOT NULL ORDER BY r.n"
    )
    async with db.execute(query, (RANGE_SPAN, *params)) as cur:
        async for id_, at, step, sink, status in cur:
            entry = by_id.get(id_)
            if entry is not None:
                entry.steps.append(JournalStep(float(at), step, sink, status))
    for entry in entries:
        entry.steps.sort(key=lambda step: step.at)


async def trace(db: aiosqlite.Connection, key: str, limit: int = 1000) -> list[JournalEntry]:
    """Every entry whose id, work order or lot is ``key``, oldest first, with its steps."""
    where = (
        "j.n IN (SELECT n FROM (SELECT n FROM journal WHERE id = ? UNION SELECT n FROM journal WHERE work_order = ? "
        "UNION SELECT n FROM journal WHERE lot = ?) ORDER BY n LIMIT ?)"
    )
    params = (key, key, key, limit)
    async with db.execute(f"SELECT {_ENTRY_COLUMNS} FROM journal j WHERE {where} ORDER BY j.n", params) as cur:
        entries = [_entry_of(row) for row in await cur.fetchall()]
    if entries:
        await _with_steps(db, entries, where, params)
    return entries


async def entries_of(db: aiosqlite.Connection, ids: Sequence[str]) -> dict[str, JournalEntry]:
    """The entries of ``ids`` (those the journal knows), with their steps."""
    found: dict[str, JournalEntry] = {}
    unique = list(dict.fromkeys(ids))
    for start in range(0, len(unique), 500):  # within SQLite's limit on bound parameters
        chunk = tuple(unique[start : start + 500])
        marks = ",".join("?" * len(chunk))
        where = f"j.id IN ({marks})"
        async with db.execute(f"SELECT {_ENTRY_COLUMNS} FROM journal j WHERE {where}", chunk) as cur:
            entries = [_entry_of(row) for row in await cur.fetchall()]
        if entries:
            await _with_steps(db, entries, where, chunk)
        found.update((entry.id, entry) for entry in entries)
    return found


async def body_of(db: aiosqlite.Connection, event_id: str) -> bytes | None:
    """The stored CloudEvent bytes of ``event_id``, or None."""
    async with db.execute("SELECT body FROM journal WHERE id = ?", (event_id,)) as cur:
        row = await cur.fetchone()
    return None if row is None else bytes(row[0])


async def window(
    db: aiosqlite.Connection, start: float, end: float, type_: str | None = None, *, by: str = "delivered"
) -> list[tuple[str, str, float | None, str | None]]:
    """``(id, type, delivered, outcome)`` of the entries whose ``by`` time is in ``[start, end)``, in that order."""
    if by not in ("delivered", "committed"):
        raise ValueError("by: must be 'delivered' or 'committed'")
    query = f"SELECT id, type, delivered, outcome FROM journal WHERE {by} >= ? AND {by} < ?"
    params: tuple[Any, ...] = (start, end)
    if type_ is not None:
        query += " AND type = ?"
        params = (*params, type_)
    async with db.execute(query + f" ORDER BY {by}, n", params) as cur:
        return [(str(i), str(t), d, o) for i, t, d, o in await cur.fetchall()]


def now_or(at: float) -> float:
    """``at``, or the current time when it is 0 (unset)."""
    return at or time.time()
