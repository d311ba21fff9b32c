"""The delivery journal: what happened to every transaction and operational event, kept after delivery.

It lives in the buffer's SQLite file, in its own tables, written in the same transaction
as the group commit that stores the events (so it survives ``kill -9`` exactly as they
do). Nothing in it is written per event on the way in:

- ``journal_segments``: the journal's copy of every segment of the transaction and
  operational lanes (the same compressed bytes the lane gets, written a second time,
  not encoded again), with its commit time and ``keys``: its entries (see ``_Columns``:
  ids, sequences, types, work orders, lots, and per event what a trace shows without
  reading the event's body), compressed as segments are and kept before the events in
  the row, so a lookup never reads a body. An event's entry is its place in a segment.
- ``journal_held``: an event known before it has a sequence (held by the sequencing
  guard, or a dead letter made before any sink), one row each: rare.
- ``journal_key_runs`` and ``journal_keys``: runs of hashes of ids, work orders and lots
  -> the segments that hold them, written every ``MERGE_EVERY`` events or so in pages
  (a B-tree of random ids would cost a page write per event) and compacted by level;
  the segments after the last run are read in full by a lookup.
- ``journal_ranges``: what happened to a whole batch, one row per batch, sink, lane and
  step (``attempt``, ``acked``) covering a run of sequences of that lane. The first
  acknowledgement of an event is its delivery: found from these, never written per event.
- ``journal_steps``: what happened to one event (a dead letter, a replay, a receiver's
  reference), by id; ``journal_outcomes``: the ERP's verdict, one row per id.

A range never spans more than ``RANGE_SPAN`` sequences (a batch whose events are further
apart is cut into several rows), so the ranges covering one sequence are found by an
index probe over at most that many starting sequences.

This module holds the shapes, the schema, the reads and the writes; ``buffer.store``
queues the writes with its group commit.
"""

from __future__ import annotations

import array
import bisect
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import aiosqlite
import msgspec

from agent.events import LANE_OF_TYPE, TYPE_PREFIX, decode_event
from agent.sink import BufferedEvent
from buffer.segment import LazySegment, pack_bytes, unpack_bytes

RANGE_SPAN = 64
"""The widest run of sequences one ``journal_ranges`` row covers (see the module docstring)."""

MERGE_EVERY = 5_000
"""Events appended before their keys are merged into ``journal_keys`` (the tail a lookup reads)."""

TRIM_SEGMENTS = 16
"""Segments trimmed at most per transaction (up to 1,024 events each): the writer is held for tens of
milliseconds, not seconds."""

JOURNAL_SCHEMA = """
CREATE TABLE IF NOT EXISTS journal_segments (
    first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL, lane TEXT NOT NULL, committed REAL NOT NULL,
    keys BLOB NOT NULL, events BLOB NOT NULL
);
DROP INDEX IF EXISTS journal_segments_lane;
DROP INDEX IF EXISTS journal_segments_committed;
CREATE TABLE IF NOT EXISTS journal_held (
    n INTEGER PRIMARY KEY, id TEXT NOT NULL, type TEXT NOT NULL, committed REAL NOT NULL,
    work_order TEXT, lot TEXT, trigger TEXT, body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS journal_held_id ON journal_held(id);
CREATE INDEX IF NOT EXISTS journal_held_work_order ON journal_held(work_order) WHERE work_order IS NOT NULL;
CREATE INDEX IF NOT EXISTS journal_held_lot ON journal_held(lot) WHERE lot IS NOT NULL;
CREATE TABLE IF NOT EXISTS journal_key_runs (
    run INTEGER PRIMARY KEY, level INTEGER NOT NULL, last_seq INTEGER NOT NULL, firsts BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS journal_keys (
    run INTEGER NOT NULL, low INTEGER NOT NULL, keys BLOB NOT NULL, PRIMARY KEY (run, low)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal_steps (
    n INTEGER PRIMARY KEY, id TEXT NOT NULL, at REAL NOT NULL, step TEXT NOT NULL, sink TEXT, status TEXT,
    reference TEXT, detail TEXT
);
CREATE INDEX IF NOT EXISTS journal_steps_id ON journal_steps(id);
CREATE INDEX IF NOT EXISTS journal_steps_replayed ON journal_steps(at) WHERE step = 'replayed';
CREATE TABLE IF NOT EXISTS journal_outcomes (
    id TEXT PRIMARY KEY, type TEXT NOT NULL, outcome TEXT NOT NULL, at REAL NOT NULL, reference TEXT, reason TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal_ranges (
    n INTEGER PRIMARY KEY, lane TEXT NOT NULL, first_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,
    at REAL NOT NULL, step TEXT NOT NULL, sink TEXT NOT NULL, status TEXT
);
CREATE INDEX IF NOT EXISTS journal_ranges_seq ON journal_ranges(lane, first_seq);
CREATE INDEX IF NOT EXISTS journal_ranges_acked ON journal_ranges(at) WHERE step = 'acked';
"""

JOURNAL_TABLES = (
    "journal_segments", "journal_held", "journal_key_runs", "journal_keys", "journal_steps", "journal_outcomes",
    "journal_ranges",
)  # fmt: skip
_EARLIER_TABLES = (
    "journal", "journal_ids", "journal_steps", "journal_ranges", "journal_segments", "journal_held", "journal_keys",
    "journal_key_runs", "journal_outcomes",
)  # fmt: skip


KEY_HASH = "crc32/paged-runs/levels"
"""How ``journal_keys`` hashes (kept in ``meta``: an index made another way is made again)."""


async def migrate(db: aiosqlite.Connection) -> bool:
    """Before ``JOURNAL_SCHEMA`` runs: a journal of an earlier layout (a row per event) is dropped, to
    start afresh in this one (True when one was); an index of keys hashed another way is emptied, to be
    merged again."""
    rows = await db.execute_fetchall("SELECT name FROM sqlite_master WHERE type='table' AND name = 'journal'")
    columns = [str(row[1]) for row in await db.execute_fetchall("PRAGMA table_info(journal_segments)")]
    earlier = "keys" in columns and columns.index("keys") > columns.index("events")
    dropped = bool(list(rows)) or earlier or ("events" in columns and "keys" not in columns)
    if dropped:
        for table in _EARLIER_TABLES:
            await db.execute(f"DROP TABLE IF EXISTS {table}")
        await db.execute("DELETE FROM meta WHERE key LIKE 'journal_%'")
    stored = list(await db.execute_fetchall("SELECT value FROM meta WHERE key = 'journal_key_hash'"))
    if stored and stored[0][0] != KEY_HASH:
        tables = await db.execute_fetchall("SELECT name FROM sqlite_master WHERE name = 'journal_keys'")
        if list(tables):
            await db.execute("DROP TABLE journal_keys")
            await db.execute("DROP TABLE IF EXISTS journal_key_runs")
        await db.execute("DELETE FROM meta WHERE key = 'journal_indexed_seq'")
    await db.execute(
        "INSERT INTO meta(key, value) VALUES ('journal_key_hash', ?) "
        "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
        (KEY_HASH,),
    )
    return dropped


# ``keys`` comes before ``events`` in the row: SQLite reads a column after a large blob by walking the blob's
# overflow pages, and a lookup reads only the keys.
INSERT_SEGMENT = (
    "INSERT OR REPLACE INTO journal_segments(first_seq, last_seq, lane, committed, events, keys) VALUES (?,?,?,?,?,?)"
)
INSERT_HELD = "INSERT INTO journal_held(id, type, committed, work_order, lot, trigger, body) VALUES (?,?,?,?,?,?,?)"
INSERT_STEP = "INSERT INTO journal_steps(id, at, step, sink, status, reference, detail) VALUES (?,?,?,?,?,?,?)"
INSERT_RANGE = "INSERT INTO journal_ranges(lane, first_seq, last_seq, at, step, sink, status) VALUES (?,?,?,?,?,?,?)"

APPENDED, RELEASED, REPLAYED = 0, 1, 2
"""How an event came into its segment: appended by a source, released by the sequencing guard, replayed."""

EventKeys = tuple[str | None, str | None, str | None, int, str, str | None, float | str | None, str | None]
"""Per event of a segment, what its entry needs beside id, sequence and type: (work order, lot, trigger
context as JSON, how it came: ``APPENDED`` ..., source, subject, time: Unix time or the event's text,
original source)."""
HeldRow = tuple[str, str, float, str | None, str | None, str | None, bytes]
"""(id, type, committed, work order, lot, trigger JSON, body: empty for an event the guard holds)."""
StepRow = tuple[str, float, str, str | None, str | None, str | None, str | None]
"""(id, at, step, sink, status, reference, detail)."""
RangeRow = tuple[str, int, int, float, str, str, str | None]
"""(lane, first seq, last seq, at, step, sink, status)."""
Acked = tuple[str, int, str, str, float]
"""An event's first acknowledgement by any sink: (lane, seq, type, id, at)."""

_NO_KEYS: EventKeys = (None, None, None, APPENDED, "", None, None, None)
_columns_encoder = msgspec.msgpack.Encoder()
_ids_encoder = msgspec.json.Encoder()


class _Columns(msgspec.Struct, array_like=True):
    """A segment's entries: what a lookup scans (ids, sequences, types, work orders, lots) as columns, the
    rest per event, each read only when its entry is built."""

    ids: str | list[str]  # joined by newlines (one object to read), or a list when an id has one
    seqs: bytes  # array("q")
    types: tuple[list[str | None], bytes]  # coded: see ``_code``
    orders: tuple[list[str | None], bytes]
    lots: tuple[list[str | None], bytes]
    entries: list[msgspec.Raw]  # per event, its ``EventKeys``


_columns_decoder = msgspec.msgpack.Decoder(_Columns)
_keys_decoder = msgspec.msgpack.Decoder(
    tuple[str | None, str | None, str | None, int, str, str | None, float | str | None, str | None]
)


def _code(values: Sequence[str | None]) -> tuple[list[str | None], bytes]:
    """A column as its distinct values and a 16-bit code per event (no codes when there is one value: the
    usual type, lot or work order of a segment), so reading it makes a few objects, not one per event."""
    distinct = list(dict.fromkeys(values))
    if len(distinct) <= 1:
        return distinct, b""
    index = {value: number for number, value in enumerate(distinct)}
    return distinct, array.array("H", map(index.__getitem__, values)).tobytes()


class CodedColumn:
    """A coded column of a segment, read value by value."""

    __slots__ = ("_count", "codes", "values")

    def __init__(self, coded: tuple[list[str | None], bytes], count: int) -> None:
        self.values, self._count = coded[0], count
        self.codes = array.array("H")
        self.codes.frombytes(coded[1])

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> Any:
        if not self.codes:
            return self.values[0] if self.values else None
        return self.values[self.codes[index]]

    def __iter__(self) -> Iterator[Any]:
        return (self[index] for index in range(self._count))

    def indexes_of(self, value: str) -> set[int]:
        """Where ``value`` is."""
        if value not in self.values:
            return set()
        if not self.codes:
            return set(range(self._count))
        # A search of the codes' bytes (in C), not a loop over every code.
        raw = self.codes.tobytes()
        pattern = array.array("H", [self.values.index(value)]).tobytes()
        found: set[int] = set()
        at = raw.find(pattern)
        while at >= 0:
            if at % 2:
                at = raw.find(pattern, at + 1)
                continue
            found.add(at // 2)
            at = raw.find(pattern, at + 2)
        return found


def pack_columns(events: Sequence[BufferedEvent], keys: Mapping[int, EventKeys]) -> tuple[bytes, SegmentKeys]:
    """A segment's ``keys`` (its entries, see ``_Columns``, compressed as segments are), and what a merge
    indexes of it."""
    found = [keys.get(event.seq, _NO_KEYS) for event in events]
    ids = [event.id for event in events]
    joined = "\n".join(ids)
    orders = _code([k[0] for k in found])
    lots = _code([k[1] for k in found])
    blob = pack_bytes(
        _columns_encoder.encode(
            (
                joined if not ids or joined.count("\n") == len(ids) - 1 else ids,
                array.array("q", [event.seq for event in events]).tobytes(),
                _code([event.type for event in events]),
                orders,
                lots,
                found,
            )
        )
    )
    first = events[0].seq if events else 0
    indexed = SegmentKeys(
        first, ids, {o for o in orders[0] if o is not None}, {lot for lot in lots[0] if lot is not None}
    )
    return blob, indexed


def _json(values: Iterable[Any]) -> str:
    return _ids_encoder.encode(list(values)).decode()


def lane_of(type_: str) -> str:
    """The lane of a full event type ("operational" for one not in the canonical list)."""
    return LANE_OF_TYPE.get(type_.removeprefix(TYPE_PREFIX), "operational")


# What the journal's rows take in the file beyond their blobs (calibrated against SQLite's dbstat on a
# filled journal; see tests/test_journal.py).
SEGMENT_OVERHEAD = 40
_PAGE = 4096  # a segment's blob spills into overflow pages: it takes whole pages
KEY_BYTES = 8  # one key of a run of ``journal_keys``
HELD_OVERHEAD = 120
STEP_OVERHEAD = 70
RANGE_BYTES = 70
OUTCOME_OVERHEAD = 60


def segment_bytes(blob_length: int) -> int:
    """The estimated bytes a copied segment takes (its overflow pages, whole)."""
    return SEGMENT_OVERHEAD + _PAGE * ((blob_length + _PAGE - 5) // (_PAGE - 4))


def step_bytes(rows: Sequence[StepRow]) -> int:
    """The estimated bytes of per-event step rows."""
    return sum(STEP_OVERHEAD + len(row[0]) + len(row[6] or "") + len(row[5] or "") for row in rows)


# --- shapes --------------------------------------------------------------------------------------


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
    oldest_unconfirmed: float | None = None  # Unix time of the oldest delivery without an outcome


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


def decoded_keys(event: dict[str, Any], kind: int) -> EventKeys:
    """The keys of a decoded event released or replayed into its lane."""
    subject = event.get("subject")
    subject = subject if isinstance(subject, str) else None
    work_order, lot = journal_keys(event.get("data"), subject)
    source, when, origin = event.get("source"), event.get("time"), event.get("originsource")
    return (
        work_order,
        lot,
        None,
        kind,
        source if isinstance(source, str) else "",
        subject,
        when if isinstance(when, str) else None,
        origin if isinstance(origin, str) else None,
    )


def held_row(
    event_id: str, type_: str, body: bytes, committed: float, trigger: dict[str, Any] | None = None
) -> HeldRow:
    """The entry of an event known only by its encoded body (a dead letter made before any sink)."""
    try:
        event = decode_event(body)
    except msgspec.DecodeError:
        event = {}
    if not isinstance(event, dict):
        event = {}
    subject = event.get("subject")
    work_order, lot = journal_keys(event.get("data"), subject if isinstance(subject, str) else None)
    return (event_id, type_, committed, work_order, lot, trigger_text(trigger), body)


# --- finding ids, work orders and lots -----------------------------------------------------------------
#
# A merge writes one run: the hashes of the ids, work orders and lots of the segments merged, sorted,
# as ``hash << 24 | segment number`` in pages of ``KEY_PAGE`` keys (``journal_keys``, by run and the
# page's lowest key), and the first sequences of those segments (``journal_key_runs``). A run costs a
# few rows, not a B-tree row per key (about 1.8 us each, measured: more than the rest of the journal).
# A lookup of a few keys reads one or two pages per run; a large batch reads the runs whole. The
# segments after the last run (``journal_indexed_seq`` in ``meta``) are read whole by a lookup: at most
# about ``MERGE_EVERY`` events.

KEY_PAGE = 512
"""Keys per page of a run (4 KB: one SQLite page)."""
COMPACT_RUNS = 8
"""Runs of one level merged into one of the next (``compact_keys``), up to ``COMPACT_LEVELS``: a lookup
reads a page of at most about 2 x ``COMPACT_RUNS`` runs plus the top level's, and a key is written at
most ``COMPACT_LEVELS`` + 1 times."""
COMPACT_LEVELS = 2
_NUMBER_BITS = 24
_NUMBER_MASK = (1 << _NUMBER_BITS) - 1


def id_hash(event_id: str) -> int:
    """The hash a key is indexed by: CRC-32 (a collision only costs a segment read: every candidate is
    checked against the key itself, and one in 4 billion pairs collides)."""
    return zlib.crc32(event_id.encode())


def _order_hash(work_order: str) -> int:
    return id_hash("\x1fwork_order\x1f" + work_order)


def _lot_hash(lot: str) -> int:
    return id_hash("\x1flot\x1f" + lot)


async def indexed_up_to(db: aiosqlite.Connection) -> int:
    """The first sequence of the newest segment whose keys are in ``journal_keys`` (0: none)."""
    rows = list(await db.execute_fetchall("SELECT value FROM meta WHERE key = 'journal_indexed_seq'"))
    return int(rows[0][0]) if rows else 0


class EventHead(msgspec.Struct, frozen=True):
    """An event of a journaled segment, as its entry knows it (its body is read only when asked for)."""

    seq: int
    lane: str
    type: str
    id: str


class Heads:
    """A segment's events as ``EventHead``, each made when read."""

    __slots__ = ("_segment",)

    def __init__(self, segment: Segment) -> None:
        self._segment = segment

    def __len__(self) -> int:
        return len(self._segment.seqs)

    def __getitem__(self, index: int) -> EventHead:
        s = self._segment
        return EventHead(s.seqs[index], s.lane, s.types[index], s.id_at(index))

    def __iter__(self) -> Iterator[EventHead]:
        return (self[index] for index in range(len(self)))


class Segment:
    """One journaled segment: its entries, column by column (its events' bodies are read only when asked)."""

    def __init__(self, first_seq: int, last_seq: int, lane: str, committed: float, keys: bytes) -> None:
        self.first_seq, self.last_seq, self.lane, self.committed = first_seq, last_seq, lane, committed
        try:
            columns = _columns_decoder.decode(unpack_bytes(keys))
        except (msgspec.DecodeError, ValueError):
            columns = _Columns([], b"", ([], b""), ([], b""), ([], b""), [])
        self._ids: str | list[str] = columns.ids
        self._width: int | None = None  # of every id and its newline, when they are all one width
        self.seqs = array.array("q")
        self.seqs.frombytes(columns.seqs)
        count = len(self.seqs)
        self.types = CodedColumn(columns.types, count)
        self.orders = CodedColumn(columns.orders, count)
        self.lots = CodedColumn(columns.lots, count)
        self._entries = columns.entries
        self._decoded: dict[int, EventKeys] = {}
        self.events = Heads(self)

    @property
    def ids(self) -> list[str]:
        """The events' ids, in order (split from their stored form on first use)."""
        if isinstance(self._ids, str):
            self._ids = self._ids.split("\n") if self._ids or len(self.seqs) else []
        return self._ids

    def id_at(self, index: int) -> str:
        """One event's id (ids of one width are cut from their stored form without splitting it)."""
        if self._width is None:
            self._width = 0
            joined, count = self._ids, len(self.seqs)
            if isinstance(joined, str) and count:
                width, extra = divmod(len(joined) + 1, count)
                if not extra and joined[width - 1 :: width] == "\n" * (count - 1):
                    self._width = width
        if self._width and isinstance(self._ids, str):
            start = index * self._width
            return self._ids[start : start + self._width - 1]
        return self.ids[index]

    def entry(self, index: int) -> EventKeys:
        """The keys of the event at ``index`` (decoded when first read)."""
        found = self._decoded.get(index)
        if found is None:
            try:
                found = _keys_decoder.decode(self._entries[index])
            except (msgspec.DecodeError, IndexError):
                found = _NO_KEYS
            self._decoded[index] = found
        return found

    def kind(self, index: int) -> int:
        """How the event at ``index`` came into the segment (``APPENDED`` ...)."""
        return self.entry(index)[3]

    def time(self, index: int) -> float | str | None:
        """The event's ``time``: Unix time, or its own text; None when unknown."""
        return self.entry(index)[6]

    def indexes_of(self, key: str) -> list[int]:
        """The events whose work order or lot is ``key``."""
        return sorted(self.orders.indexes_of(key) | self.lots.indexes_of(key))

    def index_of(self, seq: int) -> int | None:
        index = bisect.bisect_left(self.seqs, seq)
        return index if index < len(self.seqs) and self.seqs[index] == seq else None


def _segment_of(row: Sequence[Any]) -> Segment:
    first, last, lane, committed, keys = row
    return Segment(int(first), int(last), str(lane), float(committed), bytes(keys))


_SEGMENT_COLUMNS = "first_seq, last_seq, lane, committed, keys"  # never the events: read only for a body


class SegmentCache:
    """The segments one read has decoded, by first sequence (a trace reads each at most once)."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        self.by_first: dict[int, Segment] = {}
        self._tail: list[Segment] | None = None

    async def starting(self, firsts: Iterable[int]) -> list[Segment]:
        """The segments that start at these sequences, in sequence order."""
        wanted = sorted(set(firsts) - self.by_first.keys())
        for start in range(0, len(wanted), 500):
            rows = await self.db.execute_fetchall(
                f"SELECT {_SEGMENT_COLUMNS} FROM journal_segments WHERE first_seq IN (SELECT value FROM json_each(?))",
                (_json(wanted[start : start + 500]),),
            )
            for row in rows:
                segment = _segment_of(row)
                self.by_first[segment.first_seq] = segment
        return [self.by_first[first] for first in sorted(set(firsts)) if first in self.by_first]

    async def holding(self, lane: str, seqs: Iterable[int]) -> dict[int, Segment]:
        """seq -> the segment of ``lane`` holding it (the lane's segments never overlap; other lanes' do)."""
        wanted = sorted(set(seqs))
        found: dict[int, Segment] = {}
        firsts: dict[int, int] = {}
        for start in range(0, len(wanted), 500):
            rows = await self.db.execute_fetchall(
                "SELECT s.value, (SELECT max(first_seq) FROM journal_segments WHERE lane = ? AND first_seq <= s.value) "
                "FROM json_each(?) s",
                (lane, _json(wanted[start : start + 500])),
            )
            for seq, first in rows:
                if first is not None:
                    firsts[int(seq)] = int(first)
        await self.starting(firsts.values())
        for seq, first in firsts.items():
            segment = self.by_first.get(first)
            if segment is not None and segment.last_seq >= seq:
                found[seq] = segment
        return found

    async def tail(self) -> list[Segment]:
        """The segments whose keys are not merged yet (read whole by every lookup)."""
        if self._tail is None:
            merged = await indexed_up_to(self.db)
            rows = await self.db.execute_fetchall(
                f"SELECT {_SEGMENT_COLUMNS} FROM journal_segments WHERE first_seq > ? ORDER BY first_seq", (merged,)
            )
            self._tail = []
            for row in rows:
                segment = self.by_first.get(int(row[0])) or _segment_of(row)
                self.by_first[segment.first_seq] = segment
                self._tail.append(segment)
        return self._tail


Occurrence = tuple[Segment, int]
"""An event in a segment: the segment and its index there."""


async def locate(cache: SegmentCache, ids: Sequence[str]) -> dict[str, list[Occurrence]]:
    """Where each of ``ids`` is in the journaled segments, oldest first (more than one: committed again)."""
    wanted = set(ids)
    found: dict[str, list[Occurrence]] = {}
    if not wanted:
        return found
    firsts = await _indexed(cache.db, (id_hash(event_id) for event_id in wanted))
    segments = await cache.starting(firsts)
    merged = {segment.first_seq for segment in segments}
    for segment in [*segments, *(s for s in await cache.tail() if s.first_seq not in merged)]:
        for index, event_id in enumerate(segment.ids):
            if event_id in wanted:
                found.setdefault(event_id, []).append((segment, index))
    for occurrences in found.values():
        occurrences.sort(key=lambda occurrence: occurrence[0].seqs[occurrence[1]])
    return found


@dataclass
class SegmentKeys:
    """What ``journal_keys`` indexes of one journaled segment: its ids, work orders and lots."""

    first_seq: int
    ids: list[str]
    orders: set[str]
    lots: set[str]

    @classmethod
    def of(cls, segment: Segment) -> SegmentKeys:
        return cls(
            segment.first_seq,
            list(segment.ids),
            {order for order in segment.orders.values if order is not None},
            {lot for lot in segment.lots.values if lot is not None},
        )

    def hashes(self) -> list[int]:
        return [
            *(id_hash(event_id) for event_id in self.ids),
            *(_order_hash(order) for order in self.orders),
            *(_lot_hash(lot) for lot in self.lots),
        ]


async def merge_keys(
    db: aiosqlite.Connection, segments: Sequence[SegmentKeys] | None = None, limit: int = 64
) -> tuple[int, bool, int]:
    """Index the keys of the segments after the last run as one new run.

    ``segments``: the writer's own list of them (in sequence order); None: read (up to ``limit``) from the
    file. Returns how many keys were indexed, whether more segments are left, and the first sequence of
    the last segment indexed.
    """
    merged = await indexed_up_to(db)
    more = False
    if segments is None:
        rows = list(await db.execute_fetchall(
            f"SELECT {_SEGMENT_COLUMNS} FROM journal_segments WHERE first_seq > ? ORDER BY first_seq LIMIT ?",
            (merged, limit),
        ))  # fmt: skip
        segments = [SegmentKeys.of(_segment_of(row)) for row in rows]
        more = len(rows) == limit
    segments = [segment for segment in segments if segment.first_seq > merged]
    if not segments:
        return 0, False, merged
    if len(segments) > 60_000:
        segments, more = segments[:60_000], True
    keys: set[int] = set()
    for number, segment in enumerate(segments):
        keys.update((key << _NUMBER_BITS) | number for key in segment.hashes())
    firsts = array.array("q", (segment.first_seq for segment in segments))
    last = segments[-1].first_seq
    await _write_run(db, 0, last, firsts, sorted(keys))
    await db.execute(
        "INSERT INTO meta(key, value) VALUES ('journal_indexed_seq', ?) "
        "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
        (last,),
    )
    return len(keys), more, last


async def _write_run(
    db: aiosqlite.Connection, level: int, last: int, firsts: array.array[int], ordered: Sequence[int]
) -> None:
    async with db.execute(
        "INSERT INTO journal_key_runs(level, last_seq, firsts) VALUES (?, ?, ?)", (level, last, firsts.tobytes())
    ) as cursor:
        run = cursor.lastrowid
    await db.executemany(
        "INSERT INTO journal_keys(run, low, keys) VALUES (?, ?, ?)",
        [
            (run, ordered[start], array.array("Q", ordered[start : start + KEY_PAGE]).tobytes())
            for start in range(0, len(ordered), KEY_PAGE)
        ],
    )


async def compact_keys(db: aiosqlite.Connection) -> int:
    """Merge the ``COMPACT_RUNS`` oldest runs of the lowest level that has as many into one run of the next
    (one group per call, so a commit holds the writer briefly). Returns how many keys were rewritten."""
    runs = list(await db.execute_fetchall("SELECT run, level, last_seq, firsts FROM journal_key_runs ORDER BY run"))
    for level in range(COMPACT_LEVELS):
        group = [row for row in runs if row[1] == level][:COMPACT_RUNS]
        if len(group) < COMPACT_RUNS:
            continue
        firsts = array.array("q")
        merged = array.array("Q")
        for run, _, _, firsts_blob in group:
            offset = len(firsts)
            firsts.frombytes(bytes(firsts_blob))
            for (keys_blob,) in await db.execute_fetchall(
                "SELECT keys FROM journal_keys WHERE run = ? ORDER BY low", (run,)
            ):
                page = array.array("Q", bytes(keys_blob))
                # A key's segment number moves by the segments of the runs before it in the group.
                merged.extend(page if not offset else (key + offset for key in page))
        if len(firsts) > _NUMBER_MASK:
            return 0
        ordered = sorted(merged)
        await _write_run(db, level + 1, max(int(row[2]) for row in group), firsts, ordered)
        chosen = _json(int(row[0]) for row in group)
        await db.execute("DELETE FROM journal_keys WHERE run IN (SELECT value FROM json_each(?))", (chosen,))
        await db.execute("DELETE FROM journal_key_runs WHERE run IN (SELECT value FROM json_each(?))", (chosen,))
        return len(ordered)
    return 0


async def _indexed(db: aiosqlite.Connection, hashes: Iterable[int]) -> set[int]:
    """The first sequences of the merged segments that may hold one of ``hashes`` (every run searched)."""
    return set().union(*(await _indexed_each(db, hashes)).values())


async def _indexed_each(db: aiosqlite.Connection, hashes: Iterable[int]) -> dict[int, set[int]]:
    """Per hash, the first sequences of the merged segments that may hold it (every run searched)."""
    wanted = sorted(set(hashes))
    found: dict[int, set[int]] = {h: set() for h in wanted}
    if not wanted:
        return found
    runs: dict[int, array.array[int]] = {}
    for run, firsts_blob in await db.execute_fetchall("SELECT run, firsts FROM journal_key_runs"):
        runs[int(run)] = array.array("q")
        runs[int(run)].frombytes(bytes(firsts_blob))
    if len(wanted) <= 64:
        # A few keys: per run, the pages that may hold each (the one starting at or before it, and any
        # starting within its keys), each bisected on its own.
        for h, run, keys_blob in await db.execute_fetchall(
            "SELECT h.value, p.run, p.keys FROM json_each(?) h CROSS JOIN journal_key_runs r "
            "CROSS JOIN journal_keys p ON p.run = r.run AND p.low BETWEEN "
            f"coalesce((SELECT max(low) FROM journal_keys WHERE run = r.run AND low <= h.value << {_NUMBER_BITS}), 0) "
            f"AND ((h.value + 1) << {_NUMBER_BITS}) - 1",
            (_json(wanted),),
        ):
            firsts = runs.get(int(run))
            if firsts is not None:
                _matches(array.array("Q", bytes(keys_blob)), [int(h)], firsts, found)
        return found
    pages: dict[int, array.array[int]] = {}
    for run, keys_blob in await db.execute_fetchall("SELECT run, keys FROM journal_keys ORDER BY run, low"):
        pages.setdefault(int(run), array.array("Q")).frombytes(bytes(keys_blob))
    for run, keys in pages.items():
        firsts = runs.get(run)
        if firsts is not None:
            # A large batch: each run read whole (its pages in order are one sorted array), bisected per key.
            _matches(keys, wanted, firsts, found)
    return found


def _matches(
    keys: array.array[int], hashes: Sequence[int], firsts: array.array[int], found: dict[int, set[int]]
) -> None:
    """Add the segments ``keys`` (sorted) holds for each of ``hashes`` to ``found``."""
    for h in hashes:
        index = bisect.bisect_left(keys, h << _NUMBER_BITS)
        while index < len(keys) and keys[index] >> _NUMBER_BITS == h:
            found[h].add(firsts[keys[index] & _NUMBER_MASK])
            index += 1


# --- writes ----------------------------------------------------------------------------------------


@dataclass
class JournalWrites:
    """Journal rows waiting for the next group commit (beside the segments they describe)."""

    keys: dict[int, EventKeys] = field(default_factory=dict)
    """seq -> what a journaled event's entry keeps beside the event, for its segment's ``keys``."""
    unsequenced: list[HeldRow] = field(default_factory=list)
    steps: list[StepRow] = field(default_factory=list)
    ranges: list[RangeRow] = field(default_factory=list)
    acked: list[Acked] = field(default_factory=list)  # first acknowledgements (for the outcome counts)
    outcomes: list[OutcomeReport] = field(default_factory=list)

    def absorb(self, newer: JournalWrites) -> None:
        """Take ``newer``'s rows behind this one's, in order."""
        self.keys.update(newer.keys)
        self.unsequenced.extend(newer.unsequenced)
        self.steps.extend(newer.steps)
        self.ranges.extend(newer.ranges)
        self.acked.extend(newer.acked)
        self.outcomes.extend(newer.outcomes)


async def insert_unsequenced(db: aiosqlite.Connection, rows: Sequence[HeldRow]) -> int:
    """Entries known before they have a sequence (held, a dead letter made before any sink), unless the
    journal has the id already (a replay held again, a business dead letter); returns how many."""
    if not rows:
        return 0
    ids = list(dict.fromkeys(row[0] for row in rows))
    known = set((await locate(SegmentCache(db), ids)).keys())
    held = await db.execute_fetchall(
        "SELECT id FROM journal_held WHERE id IN (SELECT value FROM json_each(?))", (_json(ids),)
    )
    known.update(str(row[0]) for row in held)
    fresh: dict[str, HeldRow] = {}
    for row in rows:
        if row[0] not in known:
            fresh.setdefault(row[0], row)
    if fresh:
        await db.executemany(INSERT_HELD, list(fresh.values()))
    return len(fresh)


def held_bytes(count: int) -> int:
    return HELD_OVERHEAD * count


# --- the outcome counts ------------------------------------------------------------------------------


class OutcomeTally:
    """Per type: delivered without an outcome, posted, rejected, and the oldest unconfirmed delivery.

    Kept in memory (``/metrics`` reads it on every scrape) and in ``meta`` with every commit
    that changes it. The oldest unconfirmed delivery of a type is found again, on the
    reader, only when an outcome or a trim may have taken it: from the acknowledgement
    ranges on, starting where the last search found it (everything before it was
    confirmed, and an outcome is never taken back).
    """

    def __init__(self) -> None:
        self.counts: dict[str, OutcomeCounts] = {}
        self.stale: set[str] = set()
        self.frontier: dict[str, int] = {}  # type -> the range row its oldest unconfirmed was found at

    def of(self, type_: str) -> OutcomeCounts:
        counts = self.counts.get(type_)
        if counts is None:
            counts = self.counts[type_] = OutcomeCounts()
        return counts

    async def load(self, db: aiosqlite.Connection) -> None:
        """The counts kept in ``meta``; the oldest unconfirmed is searched for on first use."""
        self.counts = {}
        self.frontier = {}
        rows = list(await db.execute_fetchall("SELECT value FROM meta WHERE key = 'journal_tally'"))
        if rows:
            try:
                stored = msgspec.json.decode(str(rows[0][0]), type=dict[str, list[int]])
            except msgspec.DecodeError:
                stored = {}
            for type_, (unconfirmed, confirmed, rejected) in stored.items():
                self.counts[type_] = OutcomeCounts(unconfirmed, confirmed, rejected)
        self.stale = {type_ for type_, counts in self.counts.items() if counts.unconfirmed}

    def apply(self, changes: TallyChanges) -> None:
        """What a commit changed (only after it committed)."""
        for type_, delta in changes.deltas.items():
            counts = self.of(type_)
            counts.unconfirmed, counts.confirmed, counts.rejected = _added(
                [counts.unconfirmed, counts.confirmed, counts.rejected], delta
            )
            if not counts.unconfirmed:
                counts.oldest_unconfirmed = None
                self.stale.discard(type_)
        for type_ in changes.recount:
            if self.of(type_).unconfirmed:
                self.stale.add(type_)
        for type_, at in changes.delivered_at.items():
            counts = self.of(type_)
            if type_ not in self.stale and (counts.oldest_unconfirmed is None or at < counts.oldest_unconfirmed):
                counts.oldest_unconfirmed = at

    def with_deltas(self, changes: TallyChanges) -> str:
        """``dump()`` as it will be once ``changes`` are applied (written in the same commit)."""
        merged = {t: [c.unconfirmed, c.confirmed, c.rejected] for t, c in self.counts.items()}
        for type_, delta in changes.deltas.items():
            merged[type_] = _added(merged.get(type_, [0, 0, 0]), delta)
        return _ids_encoder.encode(merged).decode()

    async def settle_oldest(self, db: aiosqlite.Connection) -> None:
        """Find the oldest unconfirmed delivery of each type that may have lost it (on the reader)."""
        for type_ in sorted(self.stale):
            at, n = await oldest_unconfirmed(db, type_, self.frontier.get(type_, 0))
            counts = self.of(type_)
            counts.oldest_unconfirmed = at
            if n is not None:
                self.frontier[type_] = n
            self.stale.discard(type_)


def _added(counts: list[int], delta: list[int]) -> list[int]:
    """[unconfirmed, confirmed, rejected] after ``delta``, never below zero."""
    return [max(0, count + change) for count, change in zip(counts, delta, strict=True)]


@dataclass
class TallyChanges:
    """The outcome counts one transaction changes, applied to ``OutcomeTally`` once it committed."""

    deltas: dict[str, list[int]] = field(default_factory=dict)  # type -> [unconfirmed, confirmed, rejected]
    delivered_at: dict[str, float] = field(default_factory=dict)  # type -> earliest new first delivery
    recount: set[str] = field(default_factory=set)  # types whose oldest unconfirmed may have left

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


async def oldest_unconfirmed(db: aiosqlite.Connection, type_: str, after: int) -> tuple[float | None, int | None]:
    """The first acknowledgement, from range row ``after`` on, of an event of ``type_`` without an outcome:
    (its time, its range row), or (None, None)."""
    lane = lane_of(type_)
    cache = SegmentCache(db)
    while True:
        ranges = list(await db.execute_fetchall(
            "SELECT n, first_seq, last_seq, at FROM journal_ranges WHERE n >= ? AND lane = ? AND step = 'acked' "
            "ORDER BY n LIMIT 200",
            (after, lane),
        ))  # fmt: skip
        if not ranges:
            break
        candidates: list[tuple[int, float, str]] = []
        for (n, _, _, at), _, event in await _covered(cache, lane, ranges):
            if event.type == type_:
                candidates.append((int(n), float(at), event.id))
        if candidates:
            rows = await db.execute_fetchall(
                "SELECT id FROM journal_outcomes WHERE id IN (SELECT value FROM json_each(?))",
                (_json(c[2] for c in candidates),),
            )
            confirmed = {str(row[0]) for row in rows}
            for n, at, event_id in candidates:
                if event_id not in confirmed:
                    return at, n
        after = int(ranges[-1][0]) + 1
        cache.by_first.clear()  # bounded memory over a long search
    return None, None


async def _covered(
    cache: SegmentCache, lane: str, ranges: Sequence[Sequence[Any]]
) -> list[tuple[Sequence[Any], int, EventHead]]:
    """The events of ``lane`` that ``ranges`` (rows whose second and third values are the first and last
    sequence) cover, range by range: (the range, the sequence, the event)."""
    holding = await cache.holding(lane, (seq for r in ranges for seq in range(int(r[1]), int(r[2]) + 1)))
    covered: list[tuple[Sequence[Any], int, EventHead]] = []
    for r in ranges:
        for seq in range(int(r[1]), int(r[2]) + 1):
            segment = holding.get(seq)
            index = segment.index_of(seq) if segment is not None else None
            if segment is not None and index is not None and segment.lane == lane:
                covered.append((r, seq, segment.events[index]))
    return covered


async def count_deliveries(
    db: aiosqlite.Connection, acked: Sequence[Acked], redelivered: set[str], changes: TallyChanges, outcomes: bool
) -> None:
    """First deliveries make their events unconfirmed, unless an outcome came first (the ERP may answer
    before the acknowledgement is committed) or the event was delivered before (``redelivered``: a replay
    or resend of an id delivered under an earlier sequence)."""
    if not acked:
        return
    skip: set[str] = set(redelivered)
    if outcomes:
        rows = await db.execute_fetchall(
            "SELECT id FROM journal_outcomes WHERE id IN (SELECT value FROM json_each(?))",
            (_json(a[3] for a in acked),),
        )
        skip.update(str(row[0]) for row in rows)
    counted: set[str] = set()
    for _, _, type_, event_id, at in acked:
        if event_id in skip or event_id in counted:
            continue
        counted.add(event_id)
        changes.add(type_, unconfirmed=1)
        if type_ not in changes.delivered_at or at < changes.delivered_at[type_]:
            changes.delivered_at[type_] = at


async def replayed_ids(db: aiosqlite.Connection, ids: Iterable[str]) -> set[str]:
    """Which of ``ids`` were ever replayed (the one way an id comes into a second segment)."""
    rows = await db.execute_fetchall(
        "SELECT DISTINCT id FROM journal_steps WHERE step = 'replayed' AND id IN (SELECT value FROM json_each(?))",
        (_json(ids),),
    )
    return {str(row[0]) for row in rows}


async def redelivered(db: aiosqlite.Connection, acked: Sequence[Acked]) -> set[str]:
    """Of the events acknowledged now, those replayed after an earlier delivery (counted once already)."""
    replayed = await replayed_ids(db, {a[3] for a in acked})
    if not replayed:
        return set()
    return await delivered_before(SegmentCache(db), list(replayed), {a[1] for a in acked})


async def delivered_before(cache: SegmentCache, ids: Sequence[str], seqs: set[int]) -> set[str]:
    """Which of ``ids`` were acknowledged under a sequence other than ``seqs`` (the ones being delivered now)."""
    earlier = [
        (event_id, segment.lane, segment.seqs[index])
        for event_id, occurrences in (await locate(cache, ids)).items()
        for segment, index in occurrences
        if segment.seqs[index] not in seqs
    ]
    # A receiver's reference is acknowledged in its batch's range too: the ranges say it all.
    acked = await _acknowledged(cache.db, {(lane, seq) for _, lane, seq in earlier})
    return {event_id for event_id, _, seq in earlier if seq in acked}


async def _acknowledged(
    db: aiosqlite.Connection, lane_seqs: Iterable[tuple[str, int]], before: float | None = None
) -> dict[int, float]:
    """seq -> its first acknowledgement time by any sink (from the ranges), for those acknowledged
    (``before``: only acknowledgements before that time)."""
    by_lane: dict[str, list[int]] = {}
    for lane, seq in lane_seqs:
        by_lane.setdefault(lane, []).append(seq)
    found: dict[int, float] = {}
    for lane, seqs in by_lane.items():
        for start in range(0, len(seqs), 500):
            rows = await db.execute_fetchall(
                "SELECT s.value, min(r.at) FROM json_each(?) s JOIN journal_ranges r "
                f"ON r.lane = ? AND r.step = 'acked' AND r.first_seq BETWEEN s.value - {RANGE_SPAN} AND s.value "
                "AND r.last_seq >= s.value AND r.at < ? GROUP BY s.value",
                (_json(seqs[start : start + 500]), lane, float("inf") if before is None else before),
            )
            for seq, at in rows:
                found[int(seq)] = float(at)
    return found


async def write_outcomes(db: aiosqlite.Connection, reports: Sequence[OutcomeReport], changes: TallyChanges) -> int:
    """Business outcomes: the id's outcome row and a step, unless the same was reported already.

    Returns the estimated bytes added."""
    ids = list(dict.fromkeys(r.id for r in reports))
    cache = SegmentCache(db)
    found = await locate(cache, ids)
    types: dict[str, str] = {}
    for event_id, occurrences in found.items():
        segment, index = occurrences[0]
        types[event_id] = segment.events[index].type
    missing = [event_id for event_id in ids if event_id not in types]
    if missing:
        rows = await db.execute_fetchall(
            "SELECT id, type FROM journal_held WHERE id IN (SELECT value FROM json_each(?))", (_json(missing),)
        )
        types.update((str(i), str(t)) for i, t in rows)
    if not types:
        return 0
    rows = await db.execute_fetchall(
        "SELECT id, outcome, reference, reason FROM journal_outcomes WHERE id IN (SELECT value FROM json_each(?))",
        (_json(types),),
    )
    current: dict[str, list[Any]] = {str(row[0]): list(row[1:]) for row in rows}
    delivered = await delivered_before(cache, [i for i in types if i not in current], set())
    upserts: list[tuple[str, str, str, float, str | None, str | None]] = []
    steps: list[StepRow] = []
    for report in reports:
        type_ = types.get(report.id)
        if type_ is None:
            continue  # unknown here (trimmed, or never journaled): nothing to record
        state = current.get(report.id)
        old_reference = state[1] if state else None
        new_reference = report.reference if report.reference is not None else old_reference
        if (
            state is not None
            and state[0] == report.outcome
            and new_reference == old_reference
            and state[2] == report.reason
        ):
            continue  # the same report again
        at = now_or(report.at)
        if state is None:
            if report.id in delivered:
                changes.add(type_, unconfirmed=-1)
                changes.recount.add(type_)
        else:
            changes.count_outcome(type_, state[0], -1)
        changes.count_outcome(type_, report.outcome, 1)
        current[report.id] = [report.outcome, new_reference, report.reason]
        upserts.append((report.id, type_, report.outcome, at, new_reference, report.reason))
        steps.append((report.id, at, report.outcome, None, None, report.reference, report.reason))
    if not upserts:
        return 0
    await db.executemany(
        "INSERT INTO journal_outcomes(id, type, outcome, at, reference, reason) VALUES (?,?,?,?,?,?) "
        "ON CONFLICT(id) DO UPDATE SET outcome=excluded.outcome, at=excluded.at, reference=excluded.reference, "
        "reason=excluded.reason",
        upserts,
    )
    await db.executemany(INSERT_STEP, steps)
    return step_bytes(steps) + sum(OUTCOME_OVERHEAD + len(row[0]) + len(row[4] or "") for row in upserts)


# --- trimming ----------------------------------------------------------------------------------


@dataclass
class Trimmed:
    """What one trim did: entries removed, estimated bytes freed, and whether more is due."""

    entries: int = 0
    bytes: int = 0
    more: bool = False


async def trim(db: aiosqlite.Connection, older_than: float, excess_bytes: int, changes: TallyChanges) -> Trimmed:
    """Delete the oldest segments and held entries (with the keys, steps, outcomes and ranges only they
    needed) committed before ``older_than``, or while ``excess_bytes`` remain to be freed: a bounded chunk."""
    done = Trimmed()
    rows = list(await db.execute_fetchall(
        "SELECT first_seq, committed, length(events) + length(keys) FROM journal_segments ORDER BY first_seq LIMIT ?",
        (TRIM_SEGMENTS,),
    ))  # fmt: skip
    last_first: int | None = None
    for first, committed, size in rows:
        if committed >= older_than and excess_bytes <= 0:
            break
        last_first = int(first)
        excess_bytes -= segment_bytes(int(size))
        done.bytes += segment_bytes(int(size))
    gone: dict[str, tuple[str, str, int | None]] = {}  # id -> (type, lane, seq) of what was trimmed
    if last_first is not None:
        done.more = len(rows) == TRIM_SEGMENTS and last_first == int(rows[-1][0])
        trimmed = await db.execute_fetchall(
            f"DELETE FROM journal_segments WHERE first_seq <= ? RETURNING {_SEGMENT_COLUMNS}", (last_first,)
        )
        for row in trimmed:
            segment = _segment_of(row)
            for event in segment.events:
                done.entries += 1
                gone[event.id] = (event.type, event.lane, event.seq)
    held = list(await db.execute_fetchall(
        f"SELECT n, committed, {HELD_OVERHEAD} + length(id) + length(body) FROM journal_held ORDER BY n LIMIT 1000"
    ))  # fmt: skip
    last_held: int | None = None
    for n, committed, size in held:
        if committed >= older_than and excess_bytes <= 0:
            break
        last_held = int(n)
        excess_bytes -= int(size)
        done.bytes += int(size)
    if last_held is not None:
        done.more = done.more or (len(held) == 1000 and last_held == int(held[-1][0]))
        for event_id, type_ in await db.execute_fetchall(
            "DELETE FROM journal_held WHERE n <= ? RETURNING id, type", (last_held,)
        ):
            done.entries += 1
            gone.setdefault(str(event_id), (str(type_), lane_of(str(type_)), None))
    if gone:
        await _forget(db, gone, changes)
    # Key runs and ranges before the oldest sequence left (a key of a trimmed segment in a run still in use
    # finds nothing when looked up: it goes with its run).
    lowest = list(await db.execute_fetchall("SELECT min(first_seq) FROM journal_segments"))
    floor = int(lowest[0][0]) if lowest and lowest[0][0] is not None else 2**62
    for (run,) in await db.execute_fetchall("DELETE FROM journal_key_runs WHERE last_seq < ? RETURNING run", (floor,)):
        for (size,) in await db.execute_fetchall(
            "DELETE FROM journal_keys WHERE run = ? RETURNING length(keys)", (run,)
        ):
            done.bytes += int(size)
    removed = await db.execute_fetchall(
        "DELETE FROM journal_ranges WHERE n IN "
        "(SELECT n FROM journal_ranges WHERE last_seq < ? ORDER BY n LIMIT 20000) "
        "RETURNING 1",
        (floor,),
    )
    count = len(list(removed))
    done.bytes += RANGE_BYTES * count
    done.more = done.more or count == 20000
    return done


async def _forget(
    db: aiosqlite.Connection, gone: dict[str, tuple[str, str, int | None]], changes: TallyChanges
) -> None:
    """Trimmed entries: what only they needed goes (an id still journaled under a later sequence keeps it)."""
    ids = list(gone)
    # An id is in a later segment only when it was replayed.
    replayed = await replayed_ids(db, ids)
    # A held entry trimmed may have been released into a segment still kept: looked up too (rare).
    candidates = [*replayed, *(event_id for event_id in ids if gone[event_id][2] is None)]
    left = set((await locate(SegmentCache(db), candidates)).keys()) if candidates else set()
    rows = await db.execute_fetchall(
        "SELECT id FROM journal_held WHERE id IN (SELECT value FROM json_each(?))", (_json(ids),)
    )
    left.update(str(row[0]) for row in rows)
    forgotten = [event_id for event_id in ids if event_id not in left]
    if not forgotten:
        return
    with_outcome: set[str] = set()
    for event_id, type_, outcome in await db.execute_fetchall(
        "DELETE FROM journal_outcomes WHERE id IN (SELECT value FROM json_each(?)) RETURNING id, type, outcome",
        (_json(forgotten),),
    ):
        with_outcome.add(str(event_id))
        changes.count_outcome(str(type_), str(outcome), -1)
    unconfirmed = [i for i in forgotten if i not in with_outcome and gone[i][2] is not None]
    acked = await _acknowledged(db, ((gone[i][1], gone[i][2]) for i in unconfirmed))  # type: ignore[misc]
    for event_id in unconfirmed:
        type_, _, seq = gone[event_id]
        if seq in acked:
            changes.add(type_, unconfirmed=-1)
            changes.recount.add(type_)
    await db.execute("DELETE FROM journal_steps WHERE id IN (SELECT value FROM json_each(?))", (_json(forgotten),))


# --- reads --------------------------------------------------------------------------------------


async def has_journal(db: aiosqlite.Connection) -> bool:
    """Whether the file has the journal's tables (a file from before the journal, opened read-only, has not)."""
    rows = list(await db.execute_fetchall(
        "SELECT count(*) FROM sqlite_master WHERE type='table' AND name IN (SELECT value FROM json_each(?))",
        (_json(JOURNAL_TABLES),),
    ))  # fmt: skip
    return bool(rows) and int(rows[0][0]) >= len(JOURNAL_TABLES)


def _trigger_of(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return None
    return value if isinstance(value, dict) else None


def _time_text(value: Any) -> str | None:
    """An event's ``time`` as kept: Unix time (appended events) or its own text (decoded ones)."""
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC).isoformat().replace("+00:00", "Z")
    return value if isinstance(value, str) else None


def _decoded(body: bytes) -> dict[str, Any]:
    try:
        event = decode_event(body)
    except msgspec.DecodeError:
        return {}
    return event if isinstance(event, dict) else {}


async def entries_of(
    db: aiosqlite.Connection,
    ids: Sequence[str],
    cache: SegmentCache | None = None,
    seen: dict[str, list[Occurrence]] | None = None,
) -> dict[str, JournalEntry]:
    """The entries of ``ids`` (those the journal knows), with their steps, in the order of ``ids``.

    ``seen``: where the caller found some of them already (a trace by work order): only those replayed
    (the one way an id is in two segments) are looked up again.
    """
    cache = cache or SegmentCache(db)
    wanted = list(dict.fromkeys(ids))
    found: dict[str, JournalEntry] = {}
    for start in range(0, len(wanted), 1000):
        found.update(await _entries(cache, wanted[start : start + 1000], seen))
    return {event_id: found[event_id] for event_id in wanted if event_id in found}


async def _entries(
    cache: SegmentCache, ids: list[str], seen: dict[str, list[Occurrence]] | None = None
) -> dict[str, JournalEntry]:
    db = cache.db
    if seen is None:
        occurrences = await locate(cache, ids)
    else:
        again = await replayed_ids(db, ids)
        occurrences = {i: seen[i] for i in ids if seen.get(i) and i not in again}
        occurrences.update(await locate(cache, [i for i in ids if i not in seen or i in again]))
    held: dict[str, list[Any]] = {}
    for row in await db.execute_fetchall(
        "SELECT id, type, committed, work_order, lot, trigger, body FROM journal_held "
        "WHERE id IN (SELECT value FROM json_each(?)) ORDER BY n",
        (_json(ids),),
    ):
        held.setdefault(str(row[0]), list(row[1:]))
    known = [event_id for event_id in ids if event_id in occurrences or event_id in held]
    if not known:
        return {}
    steps: dict[str, list[JournalStep]] = {}
    for event_id, at, step, sink, status, reference, detail in await db.execute_fetchall(
        "SELECT id, at, step, sink, status, reference, detail FROM journal_steps "
        "WHERE id IN (SELECT value FROM json_each(?)) ORDER BY n",
        (_json(known),),
    ):
        steps.setdefault(str(event_id), []).append(JournalStep(float(at), step, sink, status, reference, detail))
    outcomes: dict[str, list[Any]] = {
        str(row[0]): list(row[1:])
        for row in await db.execute_fetchall(
            "SELECT id, outcome, at, reference, reason FROM journal_outcomes "
            "WHERE id IN (SELECT value FROM json_each(?))",
            (_json(known),),
        )
    }
    ranges = await _ranges_of(db, [(s.lane, s.seqs[i]) for o in occurrences.values() for s, i in o])
    entries: dict[str, JournalEntry] = {}
    for event_id in known:
        found = occurrences.get(event_id, [])
        held_row_ = held.get(event_id)
        entry = _entry(event_id, found, held_row_, steps.get(event_id, []), outcomes.get(event_id), ranges)
        entries[event_id] = entry
    return entries


async def _ranges_of(db: aiosqlite.Connection, lane_seqs: Sequence[tuple[str, int]]) -> dict[int, list[JournalStep]]:
    """seq -> the batch steps (attempts, acknowledgements) that cover it."""
    by_lane: dict[str, list[int]] = {}
    for lane, seq in lane_seqs:
        by_lane.setdefault(lane, []).append(seq)
    found: dict[int, list[JournalStep]] = {}
    for lane, unsorted in by_lane.items():
        seqs = sorted(set(unsorted))
        if seqs[-1] - seqs[0] <= 200 * len(seqs):
            # Close together (a work order's events): every range of the span at once, matched here.
            rows = await db.execute_fetchall(
                "SELECT first_seq, last_seq, at, step, sink, status FROM journal_ranges "
                "WHERE lane = ? AND first_seq BETWEEN ? AND ? ORDER BY n",
                (lane, seqs[0] - RANGE_SPAN, seqs[-1]),
            )
            for first, last, at, step, sink, status in rows:
                index = bisect.bisect_left(seqs, first)
                while index < len(seqs) and seqs[index] <= last:
                    found.setdefault(seqs[index], []).append(JournalStep(float(at), step, sink, status))
                    index += 1
            continue
        for start in range(0, len(seqs), 500):  # far apart: an index probe each
            rows = await db.execute_fetchall(
                "SELECT s.value, r.at, r.step, r.sink, r.status FROM json_each(?) s JOIN journal_ranges r "
                f"ON r.lane = ? AND r.first_seq BETWEEN s.value - {RANGE_SPAN} AND s.value AND r.last_seq >= s.value "
                "ORDER BY r.n",
                (_json(seqs[start : start + 500]), lane),
            )
            for seq, at, step, sink, status in rows:
                found.setdefault(int(seq), []).append(JournalStep(float(at), step, sink, status))
    return found


def _entry(
    event_id: str,
    found: list[Occurrence],
    held: list[Any] | None,
    steps: list[JournalStep],
    outcome: list[Any] | None,
    ranges: dict[int, list[JournalStep]],
) -> JournalEntry:
    """One entry from its occurrences in segments (oldest first), its held row, steps, outcome and ranges."""
    trigger: dict[str, Any] | None = None
    work_order = lot = None
    if held is not None:
        type_, committed, work_order, lot, trigger_json, _ = held
        trigger = _trigger_of(trigger_json)
        committed = float(committed)
    source: str = ""
    subject: str | None = None
    when: float | str | None = None
    origin: str | None = None
    if held is not None and held[5]:
        decoded = _decoded(held[5])
        source = decoded["source"] if isinstance(decoded.get("source"), str) else ""
        subject = decoded["subject"] if isinstance(decoded.get("subject"), str) else None
        when = decoded["time"] if isinstance(decoded.get("time"), str) else None
        origin = decoded["originsource"] if isinstance(decoded.get("originsource"), str) else None
    if found:
        segment, index = found[0]
        type_ = segment.types[index]
        if held is None:
            committed = segment.committed
        work_order = work_order or segment.orders[index]
        lot = lot or segment.lots[index]
        keys = segment.entry(index)
        trigger = trigger or _trigger_of(keys[2])
        source, subject = keys[4] or source, keys[5] or subject
        when, origin = keys[6] or when, keys[7] or origin
    if trigger is None and source:
        trigger = source_trigger(source, origin)
    timeline = [JournalStep(at=committed, step="committed")]
    if held is not None and not held[5]:
        # Held by the sequencing guard: its release is when it reached its lane.
        timeline.append(JournalStep(at=committed, step="held", detail=f"work order {work_order}"))
        for segment, index in found:
            if segment.kind(index) == RELEASED:
                timeline.append(JournalStep(at=segment.committed, step="released"))
                break
    delivered: float | None = None
    receiver_reference: str | None = None
    referenced = {(s.sink, s.at) for s in steps if s.step == "acked"}
    for segment, index in found:
        for step in ranges.get(segment.seqs[index], []):
            if step.step == "acked":
                delivered = step.at if delivered is None else min(delivered, step.at)
                if (step.sink, step.at) in referenced:
                    continue  # the per-event step with the reference says it
            timeline.append(step)
    for step in steps:
        if step.step == "acked":
            delivered = step.at if delivered is None else min(delivered, step.at)
            receiver_reference = receiver_reference or step.reference
        timeline.append(step)
    timeline.sort(key=lambda step: step.at)
    entry = JournalEntry(
        id=event_id,
        type=type_,
        lane=lane_of(type_),
        seq=found[-1][0].seqs[found[-1][1]] if found else None,
        committed=committed,
        source=source,
        subject=subject,
        work_order=work_order,
        lot=lot,
        source_time=_time_text(when),
        trigger=trigger,
        delivered=delivered,
        reference=receiver_reference,
        steps=timeline,
    )
    if outcome is not None:
        entry.outcome, entry.outcome_at, reference, entry.reason = outcome
        entry.reference = reference or receiver_reference
    return entry


async def trace(db: aiosqlite.Connection, key: str, limit: int = 1000) -> list[JournalEntry]:
    """Every entry whose id, work order or lot is ``key``, oldest first, with its steps."""
    cache = SegmentCache(db)
    ids: list[str] = []
    seen: set[str] = set()
    seen_at: dict[str, list[Occurrence]] = {}

    def take(event_id: str) -> None:
        if event_id not in seen:
            seen.add(event_id)
            ids.append(event_id)

    # One pass over the key runs for the key as a work order, a lot and an id.
    by_hash = await _indexed_each(db, (_order_hash(key), _lot_hash(key), id_hash(key)))
    firsts = sorted(by_hash[_order_hash(key)] | by_hash[_lot_hash(key)])
    for segment in await cache.starting(by_hash[id_hash(key)]):
        for index, event_id in enumerate(segment.ids):
            if event_id == key:
                seen_at.setdefault(key, []).append((segment, index))
    matched: list[tuple[int, str]] = []  # (seq, id), in sequence order

    def match(segment: Segment) -> None:
        # The keys first: only the events that match are decoded.
        for index in segment.indexes_of(key):
            event_id = segment.id_at(index)
            matched.append((segment.seqs[index], event_id))
            seen_at.setdefault(event_id, []).append((segment, index))

    start, step = 0, 8
    while start < len(firsts) and len(seen_at) < limit:
        for segment in await cache.starting(firsts[start : start + step]):
            match(segment)
        start, step = start + step, min(64, step * 2)  # few round trips, and no more segments than needed
    for segment in await cache.tail():  # the tail comes after every merged segment: no overlap
        match(segment)
        for index, event_id in enumerate(segment.ids):
            if event_id == key:
                seen_at.setdefault(key, []).append((segment, index))
    seen_at.setdefault(key, [])  # searched as an id: an empty list says it is none
    held = await db.execute_fetchall(
        "SELECT id FROM journal_held WHERE work_order = ? UNION SELECT id FROM journal_held WHERE lot = ?", (key, key)
    )
    held_ids = [str(row[0]) for row in held]
    take(key)
    for event_id in held_ids:
        take(event_id)
    for _, event_id in sorted(matched):
        take(event_id)
    found = await entries_of(db, ids[: limit + 1], cache, seen_at)
    entries = sorted(found.values(), key=lambda entry: (entry.committed, entry.seq or 0))
    return entries[:limit]


async def body_of(db: aiosqlite.Connection, event_id: str) -> bytes | None:
    """The stored CloudEvent bytes of ``event_id`` (its newest commit, else its held row), or None."""
    found = (await locate(SegmentCache(db), [event_id])).get(event_id)
    if found:
        segment, index = found[-1]
        rows = list(await db.execute_fetchall(
            "SELECT events FROM journal_segments WHERE first_seq = ?", (segment.first_seq,)
        ))  # fmt: skip
        if rows:
            return LazySegment(bytes(rows[0][0]))[index].body
    rows = list(await db.execute_fetchall(
        "SELECT body FROM journal_held WHERE id = ? AND length(body) > 0 ORDER BY n DESC LIMIT 1", (event_id,)
    ))  # fmt: skip
    return bytes(rows[0][0]) if rows else None


async def window(
    db: aiosqlite.Connection, start: float, end: float, type_: str | None = None, *, by: str = "delivered"
) -> list[tuple[str, str, float | None, str | None]]:
    """``(id, type, delivered, outcome)`` of the entries whose ``by`` time is in ``[start, end)``, in that order.

    An hour of a busy line is millions of events: found from the ranges and segments of the window
    and a few batched index probes, never entry by entry.
    """
    if by not in ("delivered", "committed"):
        raise ValueError("by: must be 'delivered' or 'committed'")
    cache = SegmentCache(db)
    found: dict[str, tuple[float, int, str, str]] = {}  # id -> (delivered or committed, seq, type, lane)
    if by == "delivered":
        ranges = list(await db.execute_fetchall(
            "SELECT lane, first_seq, last_seq, at FROM journal_ranges WHERE step = 'acked' AND at >= ? AND at < ? "
            "ORDER BY at, n",
            (start, end),
        ))  # fmt: skip
        for lane in {str(r[0]) for r in ranges}:
            for (_, _, _, at), seq, event in await _covered(cache, lane, [r for r in ranges if r[0] == lane]):
                if (type_ is None or event.type == type_) and event.id not in found:
                    found[event.id] = (float(at), seq, event.type, lane)
            cache.by_first.clear()
        # Acknowledged before the window (by another sink first): not in it.
        earlier = await _acknowledged(db, ((v[3], v[1]) for v in found.values()), before=start)
        found = {i: v for i, v in found.items() if v[1] not in earlier}
    else:
        # Segments are written in commit order: the window is a run of them, found by two binary searches
        # (an index of commit times would cost every commit a page more).
        low, high = await _segment_at(db, start), await _segment_at(db, end)
        firsts = [
            int(row[0])
            for row in await db.execute_fetchall(
                "SELECT first_seq FROM journal_segments WHERE first_seq >= ? AND first_seq < ? ORDER BY first_seq",
                (low, high),
            )
        ]
        for chunk in range(0, len(firsts), 64):
            for segment in await cache.starting(firsts[chunk : chunk + 64]):
                for index, event in enumerate(segment.events):
                    if segment.kind(index) != APPENDED or (type_ is not None and event.type != type_):
                        continue
                    found.setdefault(event.id, (segment.committed, event.seq, event.type, event.lane))
            cache.by_first.clear()
        for event_id, event_type, committed in await db.execute_fetchall(
            "SELECT id, type, committed FROM journal_held WHERE committed >= ? AND committed < ? ORDER BY n",
            (start, end),
        ):
            if type_ is None or event_type == type_:
                found.setdefault(str(event_id), (float(committed), -1, str(event_type), lane_of(str(event_type))))
    # An id replayed after an earlier delivery: its first delivery is the one that counts.
    replayed = {
        str(row[0])
        for row in await db.execute_fetchall(
            "SELECT DISTINCT id FROM journal_steps WHERE step = 'replayed' AND at < ?", (end,)
        )
    }
    again = [event_id for event_id in found if event_id in replayed]
    entries = await entries_of(db, again) if again else {}
    delivered = (
        await _acknowledged(db, ((v[3], v[1]) for v in found.values() if v[1] >= 0)) if by == "committed" else {}
    )
    ids = list(found)
    outcomes: dict[str, str] = {}
    for chunk in range(0, len(ids), 500):
        for event_id, outcome in await db.execute_fetchall(
            "SELECT id, outcome FROM journal_outcomes WHERE id IN (SELECT value FROM json_each(?))",
            (_json(ids[chunk : chunk + 500]),),
        ):
            outcomes[str(event_id)] = str(outcome)
    rows: list[tuple[float, int, str, str, float | None]] = []
    for event_id, (at, seq, event_type, _) in found.items():
        entry = entries.get(event_id)
        when: float | None = at if by == "delivered" else delivered.get(seq)
        if entry is not None:
            if by == "delivered" and entry.delivered is not None and entry.delivered < start:
                continue
            when = entry.delivered if entry.delivered is not None else when
        rows.append((at, seq, event_id, event_type, when))
    rows.sort()
    return [(event_id, t, when, outcomes.get(event_id)) for _, _, event_id, t, when in rows]


async def _segment_at(db: aiosqlite.Connection, at: float) -> int:
    """The first sequence of the first segment committed at or after ``at`` (past the last when none is)."""
    rows = list(await db.execute_fetchall("SELECT min(first_seq), max(first_seq) FROM journal_segments"))
    if not rows or rows[0][0] is None:
        return 0
    low, high = int(rows[0][0]), int(rows[0][1]) + 1
    while low < high:
        middle = (low + high) // 2
        found = list(await db.execute_fetchall(
            "SELECT first_seq, committed FROM journal_segments WHERE first_seq >= ? ORDER BY first_seq LIMIT 1",
            (middle,),
        ))  # fmt: skip
        if not found or found[0][1] >= at:
            high = middle
        else:
            low = int(found[0][0]) + 1
    return low


async def oldest_committed(db: aiosqlite.Connection) -> float | None:
    """The commit time of the oldest entry the journal holds (None: it is empty), for ``/status``."""
    oldest: float | None = None
    for query in (
        "SELECT committed FROM journal_segments ORDER BY first_seq LIMIT 1",
        "SELECT committed FROM journal_held ORDER BY n LIMIT 1",
    ):
        rows = list(await db.execute_fetchall(query))
        if rows:
            at = float(rows[0][0])
            oldest = at if oldest is None else min(oldest, at)
    return oldest


def now_or(at: float) -> float:
    """``at``, or the current time when it is 0 (unset)."""
    return at or time.time()
