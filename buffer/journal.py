"""The delivery journal: what happened to every transaction and operational event, kept after delivery.

It lives in the buffer's SQLite file, in its own tables, and is written in the same
transaction as the group commit that stores the events (so it survives ``kill -9``
exactly as they do, at the cost of one ``executemany`` per commit):

- ``journal``: one row per event id: its type, current sequence, commit time,
  work order and lot (indexed), the rest of what identifies it packed in one
  ``info`` value (source, subject, source time, original source, trigger: every
  column bound costs the hot path, about 0.2 us each with Python's sqlite3), then
  what happens later: the first acknowledgement, the business outcome, and for an
  event the sequencing guard held, when it was released;
- ``journal_ids``: a hash of each id -> its row, filled in sorted runs (see
  "finding an id" below: a B-tree of random ids would cost a page write per event);
- ``journal_segments``: the encoded CloudEvents, so an event can be replayed under
  the same id after its buffer row is gone. They are the very segments the group
  commit writes into the lane (the same compressed bytes, written a second time,
  not encoded again): keeping a body per entry would write ten times the bytes. A
  dead letter made before any sink keeps its body in its own row;
- ``journal_steps``: what happened to one event (a dead letter, a replay, a
  receiver's reference, a business outcome), keyed by its entry's row number;
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
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import aiosqlite
import msgspec

from agent.events import LANE_OF_TYPE, TYPE_PREFIX, decode_event
from agent.sink import BufferedEvent

RANGE_SPAN = 64
"""The widest run of sequences one ``journal_ranges`` row covers (see the module docstring)."""

JOURNAL_SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    n INTEGER PRIMARY KEY, id TEXT NOT NULL, type TEXT NOT NULL, seq INTEGER, committed REAL NOT NULL,
    work_order TEXT, lot TEXT, info BLOB NOT NULL, body BLOB NOT NULL DEFAULT x'',
    delivered REAL, outcome TEXT, outcome_at REAL, reference TEXT, reason TEXT, released REAL
);
CREATE INDEX IF NOT EXISTS journal_seq ON journal(seq) WHERE seq IS NOT NULL;
CREATE INDEX IF NOT EXISTS journal_work_order ON journal(work_order) WHERE work_order IS NOT NULL;
CREATE INDEX IF NOT EXISTS journal_lot ON journal(lot) WHERE lot IS NOT NULL;
CREATE INDEX IF NOT EXISTS journal_delivered ON journal(delivered) WHERE delivered IS NOT NULL;
CREATE INDEX IF NOT EXISTS journal_unconfirmed ON journal(type, delivered)
    WHERE delivered IS NOT NULL AND outcome IS NULL;
CREATE INDEX IF NOT EXISTS journal_outcome ON journal(type, outcome) WHERE outcome IS NOT NULL;
CREATE TABLE IF NOT EXISTS journal_ids (hash INTEGER NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (hash, n)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal_steps (
    n INTEGER PRIMARY KEY, entry INTEGER NOT NULL, at REAL NOT NULL, step TEXT NOT NULL, sink TEXT, status TEXT,
    reference TEXT, detail TEXT
);
CREATE INDEX IF NOT EXISTS journal_steps_entry ON journal_steps(entry);
CREATE TABLE IF NOT EXISTS journal_ranges (
    n INTEGER PRIMARY KEY, lane TEXT NOT NULL, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    at REAL NOT NULL, step TEXT NOT NULL, sink TEXT NOT NULL, status TEXT
);
CREATE INDEX IF NOT EXISTS journal_ranges_seq ON journal_ranges(lane, first_seq);
CREATE TABLE IF NOT EXISTS journal_segments (
    first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL, events BLOB NOT NULL
);
"""



ID_HASH = "crc32+adler32"
"""How ``journal_ids`` hashes ids (kept in ``meta``: an index made another way is made again)."""


async def migrate(db: aiosqlite.Connection) -> bool:
    """Before ``JOURNAL_SCHEMA`` runs: a journal of the first, unreleased layout (a column per field,
    a unique index of ids) is dropped, to start afresh in this one; an index of ids hashed another way
    is emptied, to be merged again. True when the journal was dropped."""
    async with db.execute("PRAGMA table_info(journal)") as cur:
        columns = {row[1] for row in await cur.fetchall()}
    async with db.execute("PRAGMA table_info(journal_steps)") as cur:
        step_columns = {row[1] for row in await cur.fetchall()}
    if step_columns and "entry" not in step_columns:
        # Steps of an earlier, unreleased layout (found by id): started afresh, keyed by their entry.
        await db.execute("DROP TABLE journal_steps")
    if columns and "lane" not in columns and "released" not in columns:
        await db.execute("ALTER TABLE journal ADD COLUMN released REAL")
    async with db.execute("SELECT value FROM meta WHERE key = 'journal_id_hash'") as cur:
        row = await cur.fetchone()
    if columns and (row is None or row[0] != ID_HASH) and "lane" not in columns:
        await db.execute("DELETE FROM journal_ids")
        await db.execute("DELETE FROM meta WHERE key = 'journal_indexed_n'")
    await db.execute(
        "INSERT INTO meta(key, value) VALUES ('journal_id_hash', ?) "
        "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
        (ID_HASH,),
    )
    if "lane" not in columns:
        return False
    for table in ("journal", "journal_ids", "journal_steps", "journal_ranges", "journal_segments"):
        await db.execute(f"DROP TABLE IF EXISTS {table}")
    await db.execute("DELETE FROM meta WHERE key LIKE 'journal_%'")
    return True

JOURNAL_TABLES = ("journal", "journal_ids", "journal_steps", "journal_ranges", "journal_segments")

# An event's row, written with the segment that stores it (an event appended: a fresh id, the dedupe
# window saw to it; a released or replayed one updates its row instead, see ``resequence``).
INSERT_ENTRY = "INSERT INTO journal(id, type, seq, committed, work_order, lot, info) VALUES (?,?,?,?,?,?,?)"
# An entry with its own body: held, or a dead letter made before any sink (not in any segment).
INSERT_HELD = "INSERT INTO journal(id, type, seq, committed, work_order, lot, info, body) VALUES (?,?,?,?,?,?,?,?)"
INSERT_SEGMENT = "INSERT OR REPLACE INTO journal_segments(first_seq, last_seq, events) VALUES (?,?,?)"
# Steps are keyed by their entry's row number, not its id: an index of random ids would cost a page
# write per step (each held event has two), an index of row numbers is written at its end.
INSERT_STEP = (
    "INSERT INTO journal_steps(entry, at, step, sink, status, reference, detail) VALUES (?,?,?,?,?,?,?)"
)
INSERT_RANGE = "INSERT INTO journal_ranges(lane, first_seq, last_seq, at, step, sink, status) VALUES (?,?,?,?,?,?,?)"

EntryRow = tuple[str, str, int | None, float, str | None, str | None, bytes]
"""(id, type, seq, committed, work order, lot, info: see ``pack_info``)."""
HeldRow = tuple[str, str, int | None, float, str | None, str | None, bytes, bytes]
"""An ``EntryRow`` and the event's body."""

_info_encoder = msgspec.msgpack.Encoder()
_info_decoder = msgspec.msgpack.Decoder(tuple[str, str | None, float | str | None, str | None, str | None])


def pack_info(
    source: str, subject: str | None, source_time: float | str | None, origin: str | None, trigger: str | None
) -> bytes:
    """An entry's ``info``: (source, subject, source time (Unix time, or the event's text), original source,
    trigger context as JSON)."""
    return _info_encoder.encode((source, subject, source_time, origin, trigger))


def lane_of(type_: str) -> str:
    """The lane of a full event type ("operational" for one not in the canonical list)."""
    return LANE_OF_TYPE.get(type_.removeprefix(TYPE_PREFIX), "operational")


_LANE_TYPES = {
    lane: ", ".join(f"'{TYPE_PREFIX}{name}'" for name, of in LANE_OF_TYPE.items() if of == lane)
    for lane in ("transaction", "operational")
}
"""The full types of each journaled lane, as an SQL list (constants of the code, never input)."""
StepRow = tuple[str, float, str, str | None, str | None, str | None, str | None]
"""(id, at, step, sink, status, reference, detail)."""
RangeRow = tuple[str, int, int, float, str, str, str | None]
"""(lane, first seq, last seq, at, step, sink, status)."""


# What one row costs in the file beyond its variable-length values: the row's other columns and its
# index entries (calibrated against SQLite's dbstat on a filled journal; see tests/test_journal.py).
ENTRY_OVERHEAD = 80
SEGMENT_OVERHEAD = 40
_PAGE = 4096  # a segment's blob spills into overflow pages: it takes whole pages


def segment_bytes(blob_length: int) -> int:
    """The estimated bytes a copied segment takes (its overflow pages, whole)."""
    return SEGMENT_OVERHEAD + _PAGE * ((blob_length + _PAGE - 5) // (_PAGE - 4))
STEP_OVERHEAD = 70
RANGE_BYTES = 70
DELIVERED_OVERHEAD = 40  # plus the type: a first delivery adds the entry to two indexes (window, unconfirmed)


def entry_bytes(rows: Sequence[EntryRow | HeldRow]) -> int:
    """The estimated bytes ``rows`` take in the file (values, their index keys, and per-row overhead).

    The rows of one commit are alike: up to 16 of them, spread over the group, stand for all (a
    loop over every row would cost the hot path more than the estimate is worth).
    """
    count = len(rows)
    if not count:
        return 0
    step = max(1, count // 16)
    sample = rows[::step]
    total = 0
    for row in sample:
        total += ENTRY_OVERHEAD + len(row[0]) + len(row[1]) + len(row[6])
        if row[4] is not None:
            total += 2 * len(row[4])
        if row[5] is not None:
            total += 2 * len(row[5])
        if len(row) > 7:
            total += len(row[7])
    return total * count // len(sample)


def step_bytes(rows: Sequence[StepRow]) -> int:
    """The estimated bytes of per-event step rows."""
    return sum(STEP_OVERHEAD + len(row[6] or "") + len(row[5] or "") for row in rows)


# --- finding an id -------------------------------------------------------------------------------
#
# Event ids are random (hashes): a B-tree index of them gets every insert on a random page, and
# every such page is written to the WAL again in each commit: measured, that tripled the cost of
# a buffer append. So ``journal_ids`` maps a 64-bit hash of the id to the row number, filled in
# sorted runs (``merge_ids``, every ``MERGE_EVERY`` entries or so) where a run touches each page
# once; the entries after the last run (``journal_indexed_n`` in ``meta``) are found by a scan of
# that short tail of row numbers.

MERGE_EVERY = 20_000
"""Entries appended before their ids are merged into ``journal_ids`` (the tail a lookup scans)."""
ID_BYTES = 20  # one row of ``journal_ids`` (hash, row number, B-tree overhead)


def id_hash(event_id: str) -> int:
    """The 64-bit (signed, as SQLite stores integers) hash an id is indexed by: two fast checksums side by
    side (a collision only costs a row read: every candidate is checked against the id itself)."""
    raw = event_id.encode()
    return ((zlib.crc32(raw) << 32) | zlib.adler32(raw)) - (1 << 63)


async def indexed_up_to(db: aiosqlite.Connection) -> int:
    """The highest row number whose id is in ``journal_ids``."""
    async with db.execute("SELECT value FROM meta WHERE key = 'journal_indexed_n'") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row is not None else 0


class RecentRows:
    """The writer's own map of the entries not merged into ``journal_ids`` yet: id -> row number.

    So the writer (a held event's existence, a release, an outcome) and the agent's own traces
    never scan that tail. Filled as the writer inserts (the rows of one ``executemany`` are
    numbered one after the other, after the highest number so far), loaded at open, and pruned
    once a merge has committed.
    """

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        self.next_n: int | None = None
        """The row number SQLite gives the next entry (the highest so far + 1); None: ask the file."""

    async def load(self, db: aiosqlite.Connection) -> None:
        merged = await indexed_up_to(db)
        async with db.execute("SELECT n, id FROM journal WHERE n > ?", (merged,)) as cur:
            self.rows = {str(event_id): int(n) for n, event_id in await cur.fetchall()}
        self.next_n = None

    def forget_numbering(self) -> None:
        """A transaction rolled back, or a trim may have removed the newest rows: ask the file next time."""
        self.next_n = None

    async def insert(self, db: aiosqlite.Connection, statement: str, rows: Sequence[Sequence[Any]]) -> None:
        """``executemany(statement, rows)`` of new entries, noting their row numbers.

        The writer is the file's only writer, so the next number is known without asking SQLite on every
        commit (a round trip to its thread each: measurable at hundreds of small commits a second).
        """
        base = self.next_n
        if base is None:
            async with db.execute("SELECT coalesce(max(n), 0) FROM journal") as cur:
                row = await cur.fetchone()
            base = int(row[0]) + 1 if row is not None else 1
        self.next_n = None  # until the insert is known to have gone in
        await db.executemany(statement, rows)
        self.next_n = base + len(rows)
        self.rows.update(zip((row[0] for row in rows), range(base, base + len(rows)), strict=True))

    def merged(self, upto: int) -> None:
        """A merge up to row ``upto`` committed: those are found through ``journal_ids`` now."""
        self.rows = {event_id: n for event_id, n in self.rows.items() if n > upto}


async def rows_of(
    db: aiosqlite.Connection, ids: Sequence[str], recent: RecentRows | None = None
) -> dict[str, list[int]]:
    """Row numbers of the entries of ``ids`` (oldest first; more than one only for an id committed again).

    ``recent``: the writer's map of the rows not merged yet; without it (a read-only look) that tail is
    scanned. A number ``recent`` has whose row did not commit yet finds nothing when read.
    """
    found: dict[str, list[int]] = {}
    wanted = list(dict.fromkeys(ids))
    if not wanted:
        return found
    merged = await indexed_up_to(db)
    if recent is not None:
        for event_id in wanted:
            n = recent.rows.get(event_id)
            if n is not None and n > merged:
                found[event_id] = [n]
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        hashes = msgspec.json.encode([id_hash(event_id) for event_id in chunk]).decode()
        names = msgspec.json.encode(chunk).decode()
        async with db.execute(
            "SELECT j.n, j.id FROM journal_ids x JOIN journal j ON j.n = x.n "
            "WHERE x.hash IN (SELECT value FROM json_each(?)) AND j.id IN (SELECT value FROM json_each(?))",
            (hashes, names),
        ) as cur:
            for n, event_id in await cur.fetchall():
                found.setdefault(event_id, []).append(int(n))
        if recent is not None:
            continue
        async with db.execute(
            "SELECT n, id FROM journal WHERE n > ? AND id IN (SELECT value FROM json_each(?))", (merged, names)
        ) as cur:
            for n, event_id in await cur.fetchall():
                found.setdefault(event_id, []).append(int(n))
    for numbers in found.values():
        numbers.sort()
    return found


async def merge_ids(db: aiosqlite.Connection, limit: int = 5 * MERGE_EVERY) -> tuple[int, bool, int]:
    """Index the ids of the entries after the last run, in hash order.

    Returns how many, whether more are left, and the highest row number now indexed.
    """
    merged = await indexed_up_to(db)
    async with db.execute("SELECT n, id FROM journal WHERE n > ? ORDER BY n LIMIT ?", (merged, limit)) as cur:
        rows = list(await cur.fetchall())
    if not rows:
        return 0, False, merged
    await db.executemany(
        "INSERT OR IGNORE INTO journal_ids(hash, n) VALUES (?, ?)", sorted((id_hash(i), int(n)) for n, i in rows)
    )
    await db.execute(
        "INSERT INTO meta(key, value) VALUES ('journal_indexed_n', ?) "
        "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
        (int(rows[-1][0]),),
    )
    return len(rows), len(rows) == limit, int(rows[-1][0])


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


def row_of(event: dict[str, Any], seq: int, committed: float) -> EntryRow:
    """The entry of a decoded event released or replayed into its lane (its body goes into its segment)."""
    source = event.get("source")
    subject = event.get("subject")
    origin = event.get("originsource")
    when = event.get("time")
    work_order, lot = journal_keys(event.get("data"), subject)
    info = pack_info(
        source if isinstance(source, str) else "",
        subject if isinstance(subject, str) else None,
        when if isinstance(when, str) else None,
        origin if isinstance(origin, str) else None,
        None,
    )
    return (str(event.get("id", "")), str(event.get("type", "")), seq, committed, work_order, lot, info)


def held_row(
    event_id: str, type_: str, body: bytes, committed: float, trigger: dict[str, Any] | None = None
) -> HeldRow:
    """The entry of an event known only by its encoded body (a dead letter made before any sink, a held one)."""
    try:
        event = decode_event(body)
    except msgspec.DecodeError:
        event = {}
    if not isinstance(event, dict):
        event = {}
    row = row_of({**event, "id": event_id, "type": type_}, 0, committed)
    info = row[6]
    if trigger is not None:
        source, subject, when, origin, _ = _info_decoder.decode(info)
        info = pack_info(source, subject, when, origin, trigger_text(trigger))
    return (row[0], row[1], None, committed, row[4], row[5], info, body)


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
            "UPDATE journal SET delivered = ? WHERE seq BETWEEN ? AND ? AND delivered IS NULL "
            f"AND type IN ({_LANE_TYPES[lane]}) RETURNING type, outcome",
            (at, first, last),
        ) as cur:
            for type_, outcome in await cur.fetchall():
                changes.bytes += DELIVERED_OVERHEAD + len(type_)
                if outcome is None:
                    changes.add(type_, unconfirmed=1)
                    if type_ not in changes.delivered_at:
                        changes.delivered_at[type_] = at


async def write_outcomes(
    db: aiosqlite.Connection, reports: Sequence[OutcomeReport], changes: TallyChanges, recent: RecentRows | None
) -> None:
    """Business outcomes: the entry's outcome columns and a step, unless the same was reported already."""
    known: dict[str, list[Any]] = {}
    found_rows = await rows_of(db, [r.id for r in reports], recent)
    numbers = {event_id: found[-1] for event_id, found in found_rows.items()}
    if not numbers:
        return
    async with db.execute(
        "SELECT n, type, delivered, outcome, reference, reason FROM journal "
        "WHERE n IN (SELECT value FROM json_each(?))",
        (msgspec.json.encode(list(numbers.values())).decode(),),
    ) as cur:
        by_n = {int(n): rest for n, *rest in await cur.fetchall()}
    for event_id, n in numbers.items():
        if n in by_n:
            known[event_id] = [n, *by_n[n]]
    updates: list[tuple[str, float, str | None, str | None, int]] = []
    steps: list[tuple[int, float, str, None, None, str | None, str | None]] = []
    for report in reports:
        row = known.get(report.id)
        if row is None:
            continue  # unknown here (trimmed, or never journaled): nothing to record
        n, type_, delivered, outcome, reference, reason = row
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
        row[3:] = [report.outcome, new_reference, report.reason]
        updates.append((report.outcome, at, new_reference, report.reason, n))
        steps.append((n, at, report.outcome, None, None, report.reference, report.reason))
    if updates:
        await db.executemany(
            "UPDATE journal SET outcome = ?, outcome_at = ?, reference = ?, reason = ? WHERE n = ?", updates
        )
        await db.executemany(INSERT_STEP, steps)


@dataclass
class JournalWrites:
    """Journal rows waiting for the next group commit (beside the segments they describe)."""

    entries: dict[str, list[EntryRow]] = field(default_factory=lambda: {"transaction": [], "operational": []})
    """Per lane, one row per event appended to that lane, in the same order as the lane's rows."""
    resequenced: dict[str, list[EntryRow]] = field(default_factory=lambda: {"transaction": [], "operational": []})
    """Per lane, events released or replayed into it (their entry takes the new sequence), in sequence order."""
    released: dict[str, float] = field(default_factory=dict)  # held events released: id -> when
    unsequenced: list[HeldRow] = field(default_factory=list)
    steps: list[StepRow] = field(default_factory=list)
    seq_steps: list[tuple[str, float, str, str | None, str | None, str | None, str | None, int]] = field(
        default_factory=list
    )
    ranges: list[RangeRow] = field(default_factory=list)
    delivered: list[tuple[float, str, int, int]] = field(default_factory=list)  # (at, lane, first seq, last seq)
    outcomes: list[OutcomeReport] = field(default_factory=list)
    references: list[tuple[str, int]] = field(default_factory=list)  # (a receiver's reference, seq)

    def absorb(self, newer: JournalWrites) -> None:
        """Take ``newer``'s rows behind this one's, in order."""
        for lane, rows in newer.entries.items():
            self.entries[lane].extend(rows)
        for lane, rows in newer.resequenced.items():
            self.resequenced[lane].extend(rows)
        self.released.update(newer.released)
        self.unsequenced.extend(newer.unsequenced)
        self.steps.extend(newer.steps)
        self.seq_steps.extend(newer.seq_steps)
        self.ranges.extend(newer.ranges)
        self.delivered.extend(newer.delivered)
        self.references.extend(newer.references)
        self.outcomes.extend(newer.outcomes)


async def write_extras(
    db: aiosqlite.Connection, writes: JournalWrites, recent: RecentRows, steps: Sequence[StepRow] = ()
) -> int:
    """Everything but the sequenced entries (those go with their segments): one ``executemany`` each;
    ``steps`` first among the steps (the dead letters'). Returns the estimated bytes added.
    """
    added = await insert_unsequenced(db, writes.unsequenced, recent)
    added += await insert_steps(db, [*steps, *writes.steps], writes.seq_steps, recent)
    if writes.ranges:
        await db.executemany(INSERT_RANGE, writes.ranges)
        added += RANGE_BYTES * len(writes.ranges)
    if writes.references:
        # The first receiver's reference is the entry's own until the ERP reports its own.
        await db.executemany(
            "UPDATE journal SET reference = ? WHERE seq = ? AND reference IS NULL", writes.references
        )
    return added


async def insert_steps(
    db: aiosqlite.Connection,
    by_id: Sequence[StepRow],
    by_seq: Sequence[tuple[str, float, str, str | None, str | None, str | None, str | None, int]],
    recent: RecentRows,
) -> int:
    """Steps of one event, found by its id or by its sequence, keyed by its entry; returns the bytes added.

    A step of an id the journal does not know (trimmed) is dropped.
    """
    rows: list[tuple[int, float, str, str | None, str | None, str | None, str | None]] = []
    if by_id:
        numbers = await rows_of(db, [step[0] for step in by_id], recent)
        rows.extend((numbers[step[0]][-1], *step[1:]) for step in by_id if step[0] in numbers)
    if by_seq:
        async with db.execute(
            "SELECT seq, n FROM journal WHERE seq IN (SELECT value FROM json_each(?))",
            (msgspec.json.encode([step[7] for step in by_seq]).decode(),),
        ) as cur:
            entry_of = {int(seq): int(n) for seq, n in await cur.fetchall()}
        rows.extend((entry_of[step[7]], *step[1:7]) for step in by_seq if step[7] in entry_of)
    if not rows:
        return 0
    await db.executemany(INSERT_STEP, rows)
    return sum(STEP_OVERHEAD + len(row[6] or "") + len(row[5] or "") for row in rows)


async def insert_unsequenced(db: aiosqlite.Connection, rows: Sequence[HeldRow], recent: RecentRows) -> int:
    """Entries known before they have a sequence (held, a dead letter made before any sink), unless the
    journal has the id already (a replay held again, a business dead letter); returns the bytes added."""
    if not rows:
        return 0
    known = await rows_of(db, [row[0] for row in rows], recent)
    fresh: dict[str, HeldRow] = {}
    for row in rows:
        if row[0] not in known:
            fresh.setdefault(row[0], row)
    if fresh:
        await recent.insert(db, INSERT_HELD, list(fresh.values()))
    return entry_bytes(list(fresh.values()))


async def resequence(
    db: aiosqlite.Connection, rows: Sequence[EntryRow], recent: RecentRows, released: Mapping[str, float]
) -> int:
    """Events released or replayed into a lane: their entry takes the new sequence (its body is in the new
    segment now); an id the journal does not know (trimmed) gets a new entry. Returns the bytes added."""
    if not rows:
        return 0
    known = await rows_of(db, [row[0] for row in rows], recent)
    updates = [(row[2], released.get(row[0]), known[row[0]][-1]) for row in rows if row[0] in known]
    if updates:
        # A held event released: the time, for its trace (its held and released steps are made up from it).
        await db.executemany(
            "UPDATE journal SET seq = ?, body = x'', released = coalesce(?, released) WHERE n = ?", updates
        )
    fresh = [row for row in rows if row[0] not in known]
    if fresh:
        await recent.insert(db, INSERT_ENTRY, fresh)
    return entry_bytes(fresh)


# --- trimming ----------------------------------------------------------------------------------

TRIM_CHUNK = 5000
"""Entries trimmed at most per transaction: the writer is held for tens of milliseconds, not seconds."""

_ENTRY_SIZE = (
    f"{ENTRY_OVERHEAD} + length(id) + length(type) + length(info) + length(body) "
    "+ 2 * coalesce(length(work_order), 0) + 2 * coalesce(length(lot), 0) "
    f"+ CASE WHEN delivered IS NULL THEN 0 ELSE {DELIVERED_OVERHEAD} + length(type) END"
)


@dataclass
class Trimmed:
    """What one trim did: entries removed, estimated bytes freed, and whether more is due."""

    entries: int = 0
    bytes: int = 0
    more: bool = False
    ids: list[str] = field(default_factory=list)  # the entries' ids


async def trim(
    db: aiosqlite.Connection, older_than: float, excess_bytes: int, changes: TallyChanges
) -> Trimmed:
    """Delete the oldest entries (with their steps, ids, segments and ranges) committed before
    ``older_than``, or while ``excess_bytes`` remain to be freed: at most ``TRIM_CHUNK``, oldest first."""
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
    if last_n is not None:
        done.more = done.entries == len(rows) == TRIM_CHUNK
        ids = done.ids
        seqs: list[int] = []
        keys: list[tuple[int, int]] = []
        async with db.execute(
            "DELETE FROM journal WHERE n <= ? RETURNING n, id, seq, type, delivered, outcome", (last_n,)
        ) as cur:
            for n, id_, seq, type_, delivered, outcome in await cur.fetchall():
                ids.append(id_)
                keys.append((id_hash(id_), int(n)))
                if seq is not None:
                    seqs.append(int(seq))
                if outcome is not None:
                    changes.count_outcome(type_, outcome, -1)
                elif delivered is not None:
                    changes.add(type_, unconfirmed=-1)
                    changes.recount.add(type_)
        keys.sort()  # in index order: each page of journal_ids touched once
        await db.executemany("DELETE FROM journal_ids WHERE hash = ? AND n = ?", keys)
        async with db.execute("SELECT max(n) FROM journal") as cur:
            row = await cur.fetchone()
        if row is None or row[0] is None:
            # Emptied: SQLite numbers the next row 1 again, so the index's run starts over too.
            await db.execute("DELETE FROM meta WHERE key = 'journal_indexed_n'")
        async with db.execute(
            "DELETE FROM journal_steps WHERE entry <= ? "
            f"RETURNING {STEP_OVERHEAD} + coalesce(length(detail), 0) + coalesce(length(reference), 0)",
            (last_n,),
        ) as cur:
            done.bytes += sum(int(row[0]) for row in await cur.fetchall())
    # Segments no entry left needs: every one before the lowest sequence still journaled.
    async with db.execute("SELECT min(seq) FROM journal WHERE seq IS NOT NULL") as cur:
        row = await cur.fetchone()
    lowest = int(row[0]) if row is not None and row[0] is not None else 2**62
    segment_chunk = TRIM_CHUNK // 100
    async with db.execute(
        "DELETE FROM journal_segments WHERE first_seq IN (SELECT first_seq FROM journal_segments "
        f"WHERE last_seq < ? ORDER BY first_seq LIMIT {segment_chunk}) RETURNING length(events)",
        (lowest,),
    ) as cur:
        segments = list(await cur.fetchall())
    done.bytes += sum(segment_bytes(int(row[0])) for row in segments)
    done.more = done.more or len(segments) == segment_chunk
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
    "id, type, seq, committed, work_order, lot, info, delivered, outcome, outcome_at, reference, reason, released, "
    "length(body)"
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
    (id_, type_, seq, committed, work_order, lot, info, delivered, outcome, outcome_at, reference, reason, released,
     body_length) = row
    try:
        source, subject, source_time, origin, trigger = _info_decoder.decode(info)
    except msgspec.DecodeError:
        source, subject, source_time, origin, trigger = "", None, None, None, None
    stored = _trigger_of(trigger)
    if stored is None and source:
        # An event a source made itself: no trigger stored per event (the hot path), made up from its source.
        stored = source_trigger(source, origin)
    entry = JournalEntry(
        id=id_,
        type=type_,
        lane=lane_of(type_),
        seq=None if seq is None else int(seq),
        committed=float(committed),
        source=source,
        subject=subject,
        work_order=work_order,
        lot=lot,
        source_time=_time_text(source_time),
        trigger=stored,
        delivered=delivered,
        outcome=outcome,
        outcome_at=outcome_at,
        reference=reference,
        reason=reason,
        steps=[JournalStep(at=float(committed), step="committed")],
    )
    if released is not None or (seq is None and not body_length):
        # Held by the sequencing guard (still, or until ``released``): steps made up from the row.
        entry.steps.append(JournalStep(at=float(committed), step="held", detail=f"work order {work_order}"))
        if released is not None:
            entry.steps.append(JournalStep(at=float(released), step="released"))
    return entry


async def _entries_at(db: aiosqlite.Connection, numbers: Sequence[int]) -> list[tuple[int, JournalEntry]]:
    """The entries at these row numbers, oldest first, with their steps and batch ranges."""
    if not numbers:
        return []
    chosen = msgspec.json.encode(sorted(set(numbers))).decode()
    where = "j.n IN (SELECT value FROM json_each(?))"
    async with db.execute(f"SELECT j.n, {_ENTRY_COLUMNS} FROM journal j WHERE {where} ORDER BY j.n", (chosen,)) as cur:
        found = [(int(row[0]), _entry_of(row[1:])) for row in await cur.fetchall()]
    by_n = dict(found)
    steps = "s.at, s.step, s.sink, s.status, s.reference, s.detail"
    for query in (
        f"SELECT j.n, {steps} FROM journal j JOIN journal_steps s ON s.entry = j.n WHERE {where}",
        # Ranges, per lane: an index probe per entry over the few ranges that may start within RANGE_SPAN
        # before it.
        *(
            "SELECT j.n, r.at, r.step, r.sink, r.status, NULL, NULL FROM journal j JOIN journal_ranges r "
            f"ON r.lane = '{lane}' AND r.first_seq BETWEEN j.seq - {RANGE_SPAN} AND j.seq AND r.last_seq >= j.seq "
            f"WHERE {where} AND j.seq IS NOT NULL AND j.type IN ({types})"
            for lane, types in _LANE_TYPES.items()
        ),
    ):
        async with db.execute(query, (chosen,)) as cur:
            for n, at, step, sink, status, reference, detail in await cur.fetchall():
                by_n[int(n)].steps.append(JournalStep(float(at), step, sink, status, reference, detail))
    for _, entry in found:
        entry.steps.sort(key=lambda step: step.at)
    return found


async def trace(
    db: aiosqlite.Connection, key: str, limit: int = 1000, recent: RecentRows | None = None
) -> list[JournalEntry]:
    """Every entry whose id, work order or lot is ``key``, oldest first, with its steps."""
    numbers = (await rows_of(db, [key], recent)).get(key, [])
    async with db.execute(
        "SELECT n FROM (SELECT n FROM journal WHERE work_order = ? UNION SELECT n FROM journal WHERE lot = ?) "
        "ORDER BY n LIMIT ?",
        (key, key, limit),
    ) as cur:
        numbers.extend(int(row[0]) for row in await cur.fetchall())
    return [entry for _, entry in await _entries_at(db, sorted(set(numbers))[:limit])]


async def entries_of(
    db: aiosqlite.Connection, ids: Sequence[str], recent: RecentRows | None = None
) -> dict[str, JournalEntry]:
    """The entries of ``ids`` (those the journal knows), with their steps; the newest for an id committed twice."""
    numbers = [found[-1] for found in (await rows_of(db, ids, recent)).values()]
    found: dict[str, JournalEntry] = {}
    for start in range(0, len(numbers), 1000):
        found.update((entry.id, entry) for _, entry in await _entries_at(db, numbers[start : start + 1000]))
    return found


def _time_text(value: Any) -> str | None:
    """An event's ``time`` as stored: Unix time (appended events) or its own text (decoded ones)."""
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC).isoformat().replace("+00:00", "Z")
    return value if isinstance(value, str) else None


_segment_decoder = msgspec.msgpack.Decoder(list[BufferedEvent])


async def body_of(db: aiosqlite.Connection, event_id: str, recent: RecentRows | None = None) -> bytes | None:
    """The stored CloudEvent bytes of ``event_id`` (from its row, else from its segment), or None."""
    numbers = (await rows_of(db, [event_id], recent)).get(event_id)
    if not numbers:
        return None
    async with db.execute("SELECT seq, body FROM journal WHERE n = ?", (numbers[-1],)) as cur:
        row = await cur.fetchone()
    if row is None:
        return None
    seq, body = row
    if body or seq is None:
        return bytes(body) if body else None
    async with db.execute(
        "SELECT events FROM journal_segments WHERE first_seq <= ? ORDER BY first_seq DESC LIMIT 1", (seq,)
    ) as cur:
        found = await cur.fetchone()
    if found is None:
        return None
    blob = bytes(found[0])
    if blob and blob[0] == 0x78:  # zlib (see buffer.store.pack_segment)
        blob = zlib.decompress(blob)
    for event in _segment_decoder.decode(blob):
        if event.seq == seq:
            return event.body
    return None


async def window(
    db: aiosqlite.Connection, start: float, end: float, type_: str | None = None, *, by: str = "delivered"
) -> list[tuple[str, str, float | None, str | None]]:
    """``(id, type, delivered, outcome)`` of the entries whose ``by`` time is in ``[start, end)``, in that order."""
    if by == "delivered":
        query = "SELECT id, type, delivered, outcome FROM journal WHERE delivered >= ? AND delivered < ?"
        params: tuple[Any, ...] = (start, end)
        order = " ORDER BY delivered, n"
    elif by == "committed":
        # Rows are numbered in commit order: the window is a run of row numbers, found by two binary searches
        # (an index of commit times would cost every append).
        query = "SELECT id, type, delivered, outcome FROM journal WHERE n >= ? AND n < ?"
        params = (await _first_committed_at(db, start), await _first_committed_at(db, end))
        order = " ORDER BY n"
    else:
        raise ValueError("by: must be 'delivered' or 'committed'")
    if type_ is not None:
        query += " AND type = ?"
        params = (*params, type_)
    async with db.execute(query + order, params) as cur:
        return [(str(i), str(t), d, o) for i, t, d, o in await cur.fetchall()]


async def _first_committed_at(db: aiosqlite.Connection, at: float) -> int:
    """The lowest row number committed at or after ``at`` (one past the last row when none is)."""
    async with db.execute("SELECT min(n), max(n) FROM journal") as cur:
        row = await cur.fetchone()
    if row is None or row[0] is None:
        return 0
    low, high = int(row[0]), int(row[1]) + 1
    while low < high:
        middle = (low + high) // 2
        async with db.execute("SELECT n, committed FROM journal WHERE n >= ? ORDER BY n LIMIT 1", (middle,)) as cur:
            found = await cur.fetchone()
        if found is None or found[1] >= at:
            high = middle
        else:
            low = int(found[0]) + 1
    return low


def now_or(at: float) -> float:
    """``at``, or the current time when it is 0 (unset)."""
    return at or time.time()
