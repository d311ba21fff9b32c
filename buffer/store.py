"""The SQLite store-and-forward buffer: append, take a batch per sink, acknowledge.

Layout: one table per lane (``lane_transaction``, ``lane_operational``,
``lane_telemetry``). A row is a *segment*: the events of one lane that one group
commit wrote, each encoded once, packed as MessagePack, keyed by the agent-wide
sequence of its first event. Segments rather than a row per event because
Python's sqlite3 releases and re-takes the GIL around every step: row-per-event
inserts and reads collapse to a few thousand rows/s while the event loop is busy,
a row per group does not.

Each sink has a ``DeliveryCursor``: per lane, the sequence up to which it has
acknowledged (or dead-lettered) everything. A segment is deleted once every
cursor that takes its lane has passed its last event. A cursor whose sink is no
longer configured, or whose sink no longer takes that lane, is *orphaned*: it is
frozen at the sequence where that happened (stored, so it survives restarts) and
keeps the backlog it had then until an operator purges it, but holds nothing
appended later. Config never deletes a backlog.

Writes go through one commit loop on one connection: whatever was appended while
the previous transaction committed goes into the next one (group commit, no added
wait), in transactions of at most ``max_rows_per_commit`` rows so the WAL stays
bounded. A group split into several transactions remembers which of them
committed, so a retry after a failure (disk full) writes only the rest. Reads
(delivery, ages, stats) use a second, read-only connection: WAL hands it only
committed data, so a sink never sees a row whose transaction may still roll back.

The id of every transaction and operational event accepted is remembered for the
dedupe window (``RecentIds``: in memory for the append path, and in the ``dedupe``
table, one row per group commit written in that same transaction), so the same id
arriving again is not stored twice, also after its original was delivered and
deleted, and after a restart.

The file is locked (``fcntl.flock`` on ``<path>.lock``) while a buffer has it open
for writing: ``plantgate buffer`` uses that to tell a stopped agent's file (opened
directly) from a running agent's (asked over HTTP). Nothing else in the project
touches SQLite.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiosqlite
import msgspec

from agent.events import LANE_OF_TYPE, LANES, TYPE_PREFIX, CloudEvent, Lane, decode_event, encode_event
from agent.files import private_directory
from agent.sink import ACKED, BufferedEvent, Delivered, Outcome, Rejected, RetryLater
from buffer import journal as journal_store
from buffer.journal import (
    INSERT_SEGMENT,
    JOURNAL_SCHEMA,
    RANGE_SPAN,
    RELEASED,
    REPLAYED,
    EventKeys,
    HeldRow,
    JournalEntry,
    JournalWrites,
    OutcomeCounts,
    OutcomeReport,
    OutcomeTally,
    TallyChanges,
    decoded_keys,
    held_row,
    journal_keys,
    trigger_text,
)
from buffer.segment import pack_segment, unpack_segment

log = logging.getLogger(__name__)

_T = TypeVar("_T")

NO_SINK = "-"
"""The sink name of a dead letter made before any sink (mapping, validation)."""

_TABLE: dict[Lane, str] = {lane: f"lane_{lane}" for lane in LANES}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS lane_transaction (
    first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL, count INTEGER NOT NULL,
    enqueued REAL NOT NULL, events BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS lane_operational (
    first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL, count INTEGER NOT NULL,
    enqueued REAL NOT NULL, events BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS lane_telemetry (
    first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL, count INTEGER NOT NULL,
    enqueued REAL NOT NULL, events BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (
    sink TEXT NOT NULL, lane TEXT NOT NULL, acked INTEGER NOT NULL, frozen_at INTEGER,
    PRIMARY KEY (sink, lane)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    n INTEGER PRIMARY KEY, id TEXT NOT NULL, sink TEXT NOT NULL, reason TEXT NOT NULL, type TEXT NOT NULL,
    subject TEXT, lane TEXT NOT NULL, time REAL NOT NULL, body BLOB NOT NULL, context TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dedupe (n INTEGER PRIMARY KEY, time REAL NOT NULL, ids BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS dedupe_time ON dedupe(time);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS held (
    n INTEGER PRIMARY KEY, id TEXT NOT NULL, work_order TEXT NOT NULL, type TEXT NOT NULL, lane TEXT NOT NULL,
    subject TEXT, arrived REAL NOT NULL, body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS held_id ON held(id);
CREATE TABLE IF NOT EXISTS released_orders (
    work_order TEXT NOT NULL, type TEXT NOT NULL, time REAL NOT NULL, PRIMARY KEY (work_order, type)
) WITHOUT ROWID;
"""

_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26

_SEGMENT_MAX_EVENTS = 1024
_ids_encoder = msgspec.msgpack.Encoder()
_ids_decoder = msgspec.msgpack.Decoder(list[str])

DEDUPE_WINDOW = 86_400.0
"""Seconds an accepted transaction or operational id is remembered by default (``[buffer] dedupe_window``)."""
DEDUPE_MAX_IDS = 200_000
"""Ids remembered at most by default (``[buffer] dedupe_max_ids``); beyond it the oldest are forgotten first."""
_DEDUPE_TRIM_INTERVAL = 1.0  # seconds between deletions of expired rows of the dedupe table
_JOURNAL_MERGE_INTERVAL = 60.0  # seconds at most before new journal keys are merged into their index


def is_corruption(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite saying the file is damaged (SQLITE_CORRUPT / SQLITE_NOTADB)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    return isinstance(exc, sqlite3.DatabaseError) and ("malformed" in str(exc) or "not a database" in str(exc))


class BufferError(Exception):
    """The buffer cannot do what was asked (cannot open, corrupt, closed)."""


class BufferLocked(BufferError):
    """Another process (a running agent) has the buffer file open for writing."""


class DeadLetter(msgspec.Struct, frozen=True):
    """An event held with the reason it could not go on; listed and replayed by operators.

    ``context`` says where a dead letter made before any sink came from: ``source``
    (the source's name), ``rule`` (the transaction rule that made the event) and
    ``values`` (tag -> ``{value, time, quality}`` as the rule read them); None when
    unknown (a sink's rejection, or a file from before the context was kept).
    """

    id: str
    sink: str
    reason: str
    type: str
    subject: str | None
    lane: Lane
    time: float
    body: bytes
    context: dict[str, Any] | None = None


class DeadLetterGroup(msgspec.Struct):
    """The dead letters of one sink, summed up for /status and metrics."""

    count: int
    oldest: float  # when the oldest of them became a dead letter (Unix time)
    reasons: dict[str, int]  # the most frequent reasons (truncated), most frequent first


class Eviction(msgspec.Struct):
    """Telemetry evicted from one source because the buffer hit its cap (for the gap event)."""

    source: str
    tags: list[str]
    events: int
    samples: int
    start: datetime
    end: datetime


class LaneStats(msgspec.Struct):
    depth: int
    oldest_age_seconds: float | None


class SinkStats(msgspec.Struct):
    depth: int
    lanes: dict[str, LaneStats]


class HeldStats(msgspec.Struct):
    """Events the sequencing guard holds: how many, the oldest one's age, and how many per type."""

    count: int = 0
    oldest_age_seconds: float | None = None
    types: dict[str, int] = msgspec.field(default_factory=dict)  # canonical type name -> held


class BufferStats(msgspec.Struct, omit_defaults=True):
    """What ``plantgate buffer stats`` and ``/status`` show (the ``--json`` shape is contract)."""

    sinks: dict[str, SinkStats]
    dead_letters: int
    orphaned: dict[str, int]
    size_bytes: int
    held: HeldStats | None = None
    """Extension: what the sequencing guard holds (not yet in any sink's backlog); left out when nothing is."""


class SequencingEntry(Protocol):
    """A ``[[sequencing]]`` entry as the buffer needs it (``agent.settings.SequencingRule``)."""

    @property
    def type(self) -> str: ...  # canonical name, without the type prefix

    @property
    def after(self) -> list[str]: ...

    @property
    def hold(self) -> float: ...


@dataclass(frozen=True)
class _Guard:
    after: frozenset[str]  # full event types that release the guarded type
    hold: float
    reason: str  # the dead letter's reason, less the work order


@dataclass
class _Held:
    """An event the sequencing guard holds, in memory and in the ``held`` table."""

    id: str
    work_order: str
    type: str
    lane: Lane
    subject: str | None
    arrived: float
    body: bytes  # the encoded event, without a sequence


def work_order_of(data: Any, subject: str | None) -> str | None:
    """The work order an event belongs to for sequencing: ``data.work_order``, else ``subject``."""
    value = data.get("work_order") if isinstance(data, dict) else getattr(data, "work_order", None)
    if value is not None and value != "":
        return value if isinstance(value, str) else str(value)
    return subject or None


@dataclass
class _LaneCursor:
    acked: int  # everything <= acked is delivered or dead-lettered for this sink
    depth: int = 0  # rows in the lane with seq > acked (and <= frozen_at when frozen)
    frozen_at: int | None = None  # orphaned: holds only rows up to this sequence

    def holds(self, seq: int) -> bool:
        return seq > self.acked and (self.frozen_at is None or seq <= self.frozen_at)


@dataclass
class _Pending:
    rows: dict[Lane, list[BufferedEvent]] = field(default_factory=lambda: {lane: [] for lane in LANES})
    done: dict[Lane, int] = field(default_factory=lambda: dict.fromkeys(LANES, 0))
    """Rows of each lane already committed (a group split into several transactions)."""
    dead: list[DeadLetter] = field(default_factory=list)
    dead_delete: list[int] = field(default_factory=list)  # dead letters replayed or purged (by row number)
    dead_reason: list[tuple[str, float, int]] = field(default_factory=list)  # replay failed again: new reason
    cursor_delete: list[tuple[str, Lane]] = field(default_factory=list)  # purged backlogs
    lane_clear: dict[Lane, int] = field(default_factory=dict)  # lanes left without a cursor: rows up to seq
    state: dict[str, str | None] = field(default_factory=dict)  # None deletes the key
    dedupe: list[str] = field(default_factory=list)  # ids newly remembered: one row of the dedupe table
    dedupe_time: float = 0.0  # when the newest of them was accepted
    held_add: list[_Held] = field(default_factory=list)  # sequencing: newly held
    held_drop: list[str] = field(default_factory=list)  # sequencing: released or expired (by id)
    released: list[tuple[str, str, float]] = field(default_factory=list)  # (work order, after type, time)
    released_before: float = 0.0  # sequencing: forget releases older than this
    journal: JournalWrites = field(default_factory=JournalWrites)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    count: int = 0

    def absorb(self, newer: _Pending) -> None:
        """Take ``newer``'s work behind this one's, in order."""
        for lane in LANES:
            self.rows[lane].extend(newer.rows[lane])
        self.journal.absorb(newer.journal)
        self.dead.extend(newer.dead)
        self.dead_delete.extend(newer.dead_delete)
        self.dead_reason.extend(newer.dead_reason)
        self.cursor_delete.extend(newer.cursor_delete)
        self.lane_clear.update(newer.lane_clear)
        self.state.update(newer.state)
        self.dedupe.extend(newer.dedupe)
        self.dedupe_time = max(self.dedupe_time, newer.dedupe_time)
        self.held_add.extend(newer.held_add)
        self.held_drop.extend(newer.held_drop)
        self.released.extend(newer.released)
        self.released_before = max(self.released_before, newer.released_before)
        self.waiters.extend(newer.waiters)
        self.count += newer.count


@dataclass
class _Txn:
    """What one transaction did to the in-memory counters; applied only once it committed."""

    inserted: dict[Lane, list[BufferedEvent]] = field(default_factory=dict)
    evicted: list[BufferedEvent] = field(default_factory=list)
    telemetry_delta: int = 0
    journaled: list[journal_store.SegmentKeys] = field(default_factory=list)  # segments copied into the journal


class DeliveryCursor:
    """One sink's position in the buffer: hands out batches, takes acknowledgements.

    Batches come lane by lane in drain order (transactions, then operational, then
    telemetry), each lane in sequence order. The agent's delivery loop calls
    ``next_batch``, gives the batch to the sink and passes the outcomes to
    ``settle``; anything not acknowledged is handed out again by the next
    ``next_batch``, with the same body and id.
    """

    def __init__(self, buffer: Buffer, sink: str, lanes: Iterable[Lane]):
        self._buffer = buffer
        self.sink = sink
        self.lanes: tuple[Lane, ...] = tuple(lane for lane in LANES if lane in set(lanes))
        self._lanes = {lane: buffer._cursor_state(sink, lane) for lane in self.lanes}

    def depth(self, lane: Lane | None = None) -> int:
        """Events of this sink's lanes still waiting for its acknowledgement."""
        if lane is not None:
            state = self._lanes.get(lane)
            return state.depth if state else 0
        return sum(state.depth for state in self._lanes.values())

    async def next_batch(self, max_events: int, *, wait: bool = True) -> list[BufferedEvent]:
        """Up to ``max_events`` undelivered events; with ``wait``, blocks until there is one."""
        while True:
            batch = await self._buffer._read(self.sink, self._lanes, max_events)
            if batch or not wait:
                return batch
            if self.depth() > 0 and self._buffer._healthy.is_set():
                # The depth counters disagree with the file (they never should): trust the
                # file, say so, and wait for new events instead of spinning.
                log.warning("Buffer depth out of step with the file; recounting", extra={"sink": self.sink})
                await self._buffer._recount()
                if self.depth() > 0:
                    for state in self._lanes.values():
                        state.depth = 0
            await self._buffer._wait_for_new(self)

    def settle(self, batch: Sequence[BufferedEvent], outcomes: Sequence[Outcome]) -> Settlement:
        """Record what the sink reported for ``batch``.

        Per lane, the cursor advances over the leading run of acknowledged and
        rejected events; from the first ``RETRY`` on, that lane's events are handed
        out again (a later acknowledged one may be sent twice, same id: at least
        once, never lost). Rejected events become dead letters in the same commit
        that advances the cursor.
        """
        if len(outcomes) != len(batch):
            raise ValueError(f"sink {self.sink} returned {len(outcomes)} outcomes for {len(batch)} events")
        settlement = Settlement()
        blocked: set[Lane] = set()
        advance: dict[Lane, int] = {}
        journal = _Settled() if self._buffer.journal_enabled else None
        for event, outcome in zip(batch, outcomes, strict=True):
            lane = event.lane
            if journal is not None and lane != "telemetry":
                journal.add(event, outcome)
            if lane in blocked:
                continue
            if outcome is ACKED or type(outcome) is Delivered:
                advance[lane] = event.seq
                settlement.acked.append(event)
            elif isinstance(outcome, Rejected):
                advance[lane] = event.seq
                settlement.rejected.append((event, outcome.reason))
            else:
                blocked.add(lane)
                settlement.retry += 1
        dead = [_dead_letter_of(event, self.sink, reason) for event, reason in settlement.rejected]
        if journal is not None:
            self._buffer._journal_settled(self.sink, journal)
        self._buffer._advance(self.sink, self._lanes, advance, batch, dead)
        return settlement


class _Settled:
    """What one batch's outcomes say for the journal: ranges per lane and step, references per event.

    A range claims every event of its lane between its first and last sequence, so a
    run ends at any event of that lane with another outcome (and at ``RANGE_SPAN``).
    """

    __slots__ = ("_open", "acked", "ranges", "referenced")

    def __init__(self) -> None:
        self.ranges: list[list[Any]] = []  # [lane, first, last, step, status]
        self.referenced: list[tuple[str, str]] = []  # (id, the receiver's reference)
        self.acked: list[tuple[str, int, str, str]] = []  # (lane, seq, type, id) acknowledged
        self._open: dict[str, list[Any] | None] = {}  # lane -> its open range

    def add(self, event: BufferedEvent, outcome: Outcome) -> None:
        lane, seq = event.lane, event.seq
        step: str | None = None
        status: str | None = None
        if outcome is ACKED or type(outcome) is Delivered:
            # The acknowledgement is in the batch's range either way (deliveries are found from ranges);
            # a receiver's reference is a step of the event's own.
            step, status = "acked", "ok"
            reference = outcome.reference if type(outcome) is Delivered else None
            if reference is not None:
                self.referenced.append((event.id, reference))
            self.acked.append((lane, seq, event.type, event.id))
        else:
            if isinstance(outcome, RetryLater):
                step, status = "attempt", outcome.reason or "retry"
        current = self._open.get(lane)
        if step is None:
            self._open[lane] = None
        elif current is not None and current[3] == step and current[4] == status and seq - current[1] <= RANGE_SPAN:
            current[2] = seq
        else:
            current = [lane, seq, seq, step, status]
            self.ranges.append(current)
            self._open[lane] = current


@dataclass
class Settlement:
    """What one ``settle`` did: for metrics and logs."""

    acked: list[BufferedEvent] = field(default_factory=list)
    rejected: list[tuple[BufferedEvent, str]] = field(default_factory=list)
    retry: int = 0


def _context_text(context: dict[str, Any] | None) -> str | None:
    return None if context is None else msgspec.json.encode(context).decode()


def _context_of(text: str | None) -> dict[str, Any] | None:
    """A stored context back; one that does not decode to an object is shown as none, not an error."""
    if text is None:
        return None
    try:
        context = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return None
    return context if isinstance(context, dict) else None


def _replay_detail(n: int | None) -> str:
    return "resent from the journal" if n is None else f"from dead letter {n}"


def _entry_keys(event: CloudEvent, contexts: Mapping[str, dict[str, Any]] | None) -> EventKeys:
    """What the journal's entry of an appended event needs beside its id, sequence and type: the work order
    and lot it is found by, a rule's trigger (none for a source's own event: made up from its source when
    read), its source, subject, time and original source (so a trace never reads the event's body)."""
    work_order, lot = journal_keys(event.data, event.subject)
    context = contexts.get(event.id) if contexts else None
    trigger = None if context is None else trigger_text(context)
    return (work_order, lot, trigger, 0, event.source, event.subject, event.time.timestamp(), event.originsource)


def _held_entry(event: CloudEvent, now: float, contexts: Mapping[str, dict[str, Any]] | None) -> HeldRow:
    """The entry of an event the sequencing guard holds (its body is in the held table until released)."""
    work_order, lot = journal_keys(event.data, event.subject)
    context = contexts.get(event.id) if contexts else None
    return (event.id, event.type, now, work_order, lot, None if context is None else trigger_text(context), b"")


def _dead_letter_of(event: BufferedEvent, sink: str, reason: str) -> DeadLetter:
    subject = decode_event(event.body).get("subject")
    return DeadLetter(
        id=event.id,
        sink=sink,
        reason=reason,
        type=event.type,
        subject=subject,
        lane=event.lane,
        time=time.time(),
        body=event.body,
    )


class Buffer:
    """The durable store-and-forward buffer (see the module docstring)."""

    def __init__(
        self,
        path: Path,
        *,
        telemetry_max_rows: int = 1_000_000,
        max_size_mb: float = 2048,
        synchronous: str = "FULL",
        max_rows_per_commit: int = 5000,
        max_pending_rows: int = 20_000,
        dedupe_window: float | None = None,
        dedupe_max_ids: int | None = None,
        sinks: Mapping[str, Iterable[Lane]] | None = None,
        commit_retry_interval: float = 1.0,
        sequencing: Iterable[SequencingEntry] | None = None,
        journal: bool = True,
        journal_retention: float = 30 * 86_400.0,
        journal_max_size_mb: float = 512,
    ):
        self.path = path
        self.journal_enabled = journal
        """Keep the delivery journal (``[journal] enabled``); off: nothing is written to it."""
        self.journal_retention = journal_retention
        self.journal_max_bytes = int(journal_max_size_mb * 1024 * 1024)
        self._journal_bytes = 0  # estimated bytes of the journal's tables (kept in ``meta`` with each commit)
        self._tally = OutcomeTally()
        self._tally_loaded = False
        self._journal_info: dict[str, Any] = {"entries": 0, "oldest_committed": None}  # refreshed by maintain
        self._journal_entries = 0  # events journaled and not trimmed yet, kept in ``meta``
        self._journal_outcomes = False  # the journal holds an outcome: a first delivery must look for one
        self._journal_replays = False  # ... a replay: a first delivery may be a second one
        self._journal_trimmed = 0  # entries trimmed (retention, size) over the file's life, kept in ``meta``
        self._journal_trim_due = False  # maintain() found entries past retention or the size bound
        self._journal_unindexed = 0  # events journaled since their keys were last merged into ``journal_keys``
        self._journal_unmerged: list[journal_store.SegmentKeys] | None = None
        """The keys of the segments journaled since the last merge (None: not known here, read them from the
        file): a merge then needs no segment decoded."""
        self._journal_merge_due = False  # maintain(): keys waiting too long for their merge
        self._journal_merge_checked = 0.0
        self._journal_shrinking = False  # trimming down to 95 % of the size bound
        # None: the rules are not known here (``plantgate buffer`` on a stopped agent's file), so
        # what is held stays held; a list, even empty, is the agent's config: held events of a
        # type no longer guarded go into their lane.
        self._sequencing_known = sequencing is not None
        sequencing = sequencing or ()
        self._guard: dict[str, _Guard] = {
            TYPE_PREFIX + rule.type: _Guard(
                after=frozenset(TYPE_PREFIX + name for name in rule.after),
                hold=float(rule.hold),
                reason=f"sequencing: no {' or '.join(rule.after)} for work order {{}} within {rule.hold:g}s",
            )
            for rule in sequencing
        }
        self._releasing = frozenset(name for guard in self._guard.values() for name in guard.after)
        self._remember_releases = max((guard.hold for guard in self._guard.values()), default=0.0)
        self._held: dict[str, list[_Held]] = {}  # work order -> held events, in arrival order
        self._released: dict[str, dict[str, float]] = {}  # work order -> after type -> when it committed
        self.telemetry_max_rows = telemetry_max_rows
        self._configured_telemetry_max_rows = telemetry_max_rows
        self.max_size_bytes = int(max_size_mb * 1024 * 1024)
        self.synchronous = synchronous.upper()
        self.max_rows_per_commit = max_rows_per_commit
        self.max_pending_rows = max_pending_rows
        self.commit_retry_interval = commit_retry_interval
        self._db: aiosqlite.Connection | None = None  # the writer: only the commit loop uses it after open
        self._reader: aiosqlite.Connection | None = None  # read-only: sees committed data only
        self._lock_fd: int | None = None
        self._page_limit: int | None = None  # set_max_page_count
        self._seq = 0
        self._pending = _Pending()
        self._wake = asyncio.Event()  # something to commit
        self._writable = asyncio.Event()  # not back-pressuring appends
        self._writable.set()
        self._healthy = asyncio.Event()  # not in the middle of moving a corrupt file aside
        self._healthy.set()
        self._corrupt: str | None = None  # a reader saw corruption: the commit loop quarantines
        self._generation = 0  # bumped by each quarantine: reads begun before it are stale
        self._refusing: str | None = None  # why writes are refused (disk full, size cap), None when fine
        self._written_since_size_check = 0
        self._size_check_bytes = max(256 * 1024, self.max_size_bytes // 64)
        self._cursors: dict[tuple[str, Lane], _LaneCursor] = {}
        self._dirty_cursors: set[tuple[str, Lane]] = set()
        self._configured: dict[str, frozenset[Lane]] | None = (
            {name: frozenset(lanes) for name, lanes in sinks.items()} if sinks is not None else None
        )
        self._new_data: dict[str, asyncio.Event] = {}
        self._telemetry_rows = 0
        self._decoded: dict[tuple[Lane, int], list[BufferedEvent]] = {}
        self._size_bytes = 0
        self._state: dict[str, str] = {}
        self._commit_task: asyncio.Task[None] | None = None
        self._closing = False
        self._commit_error: BaseException | None = None
        self.evictions: list[Eviction] = []
        """Telemetry evictions not yet reported; the agent drains it into gap events."""
        self.on_eviction: asyncio.Event = asyncio.Event()
        self.duplicates_suppressed = 0
        self.dead_letter_count = 0
        # None: what the file says (the agent's settings, stored at its last start), else the defaults;
        # so ``plantgate buffer`` opening the file never trims what the agent means to remember.
        self._dedupe_settings = (dedupe_window, dedupe_max_ids)
        self._recent_ids = RecentIds(
            DEDUPE_MAX_IDS if dedupe_max_ids is None else dedupe_max_ids,
            DEDUPE_WINDOW if dedupe_window is None else dedupe_window,
        )
        self._dedupe_trimmed_at = 0.0
        self._dedupe_settings_saved = False  # written into ``meta`` with the first commit
        self.quarantined: dict[str, Any] | None = None
        """The last corrupt file moved aside (at open or while running): path, moved_to, reason, size_bytes."""
        self.quarantines: list[dict[str, Any]] = []
        """Quarantines while running, not yet reported; the agent drains it into buffer.quarantined events."""
        self.on_quarantine: asyncio.Event = asyncio.Event()
        """Set when a corrupt file was moved aside while running (``quarantines`` says which)."""

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    async def open(self, *, readonly: bool = False) -> None:
        """Open (creating if needed), check integrity, quarantine a corrupt file, load cursors.

        ``readonly`` is for inspecting a buffer, also one a running agent is writing
        (WAL lets a reader in): no lock, no integrity repair, no commit loop, no writes.
        Otherwise the file is locked for this process; ``BufferLocked`` says another
        one (a running agent) has it.
        """
        if readonly:
            if not self.path.exists():
                raise FileNotFoundError(self.path)
            self._reader = await aiosqlite.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
        else:
            private_directory(self.path.parent)
            await self._lock()
            try:
                reason = await self._check_integrity()
                if reason is not None:
                    self.quarantined = self._quarantine(reason)
                await self._connect()
            except BaseException:
                await self._disconnect()
                self._unlock()
                raise
        try:
            await self._load()
        except BaseException:
            await self._disconnect()
            self._unlock()
            raise
        if not readonly:
            if self._configured is not None:
                await self._apply_configuration()
            self._commit_task = asyncio.create_task(self._commit_loop(), name="buffer-commit")

    async def _lock(self) -> None:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        with contextlib.suppress(PermissionError):  # a lock file of an older version was 0644
            os.fchmod(fd, 0o600)
        # A second to get it: ``lock_holder`` (plantgate buffer) probes it for an instant.
        for attempt in range(20):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt < 19:
                    await asyncio.sleep(0.05)
        else:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise BufferLocked(f"agent is running: {self.path} is in use by process {holder}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    async def _connect(self) -> None:
        """The writer (creates the file and schema), then the read-only reader."""
        _owner_only(self.path)
        db = self._db = await aiosqlite.connect(self.path, isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute(f"PRAGMA synchronous={self.synchronous}")
        # Keep the WAL from growing without bound after a burst: truncate it back after checkpoints.
        await db.execute("PRAGMA journal_size_limit=67108864")
        await db.execute("PRAGMA wal_autocheckpoint=2000")
        # Segments are read once, right after they are written: a small page cache is enough.
        await db.execute("PRAGMA cache_size=-4000")
        await db.execute("PRAGMA temp_store=MEMORY")
        if self._page_limit is not None:
            await db.execute(f"PRAGMA max_page_count={int(self._page_limit)}")
        await db.executescript(_SCHEMA)
        # Also with the journal off: a file that had one keeps it readable, and an old file gains it here.
        if await journal_store.migrate(db):
            log.warning(
                "Delivery journal of an earlier layout dropped; the journal starts afresh",
                extra={"path": str(self.path)},
            )
        await db.executescript(JOURNAL_SCHEMA)
        async with db.execute("PRAGMA table_info(cursors)") as cur:
            columns = {row[1] for row in await cur.fetchall()}
        if "frozen_at" not in columns:  # a file from before orphaned cursors were frozen
            await db.execute("ALTER TABLE cursors ADD COLUMN frozen_at INTEGER")
        async with db.execute("PRAGMA table_info(dead_letters)") as cur:
            columns = {row[1] for row in await cur.fetchall()}
        if "context" not in columns:  # a file from before dead letters kept their context: old rows stay NULL
            await db.execute("ALTER TABLE dead_letters ADD COLUMN context TEXT")
        reader = self._reader = await aiosqlite.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
        # It reads each segment about once per sink, soon after it was written: 1 MB of cache does
        # (measured: drain rate unchanged, RSS below the single shared connection's).
        await reader.execute("PRAGMA cache_size=-1000")
        # A first read: from now on the reader holds its shared lock on the file, so closing the
        # writer (quarantine) never checkpoints into, or deletes the WAL of, a file being moved aside.
        async with reader.execute("SELECT count(*) FROM meta") as cur:
            await cur.fetchall()

    async def _disconnect(self) -> None:
        """Close both connections; the writer last, so it checkpoints the WAL into the file."""
        db, reader = self._db, self._reader
        self._db = self._reader = None
        for connection in (reader, db):
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.close()

    async def _load(self) -> None:
        """The in-memory view from the file: last sequence, recent ids, cursors, counts, state."""
        db = self._reader
        assert db is not None
        seq = self._seq
        async with db.execute("SELECT value FROM meta WHERE key='last_seq'") as cur:
            row = await cur.fetchone()
            if row:
                seq = max(seq, int(row[0]))
        async with db.execute(
            "SELECT key, value FROM meta WHERE key IN ('journal_bytes', 'journal_trimmed', 'journal_entries')"
        ) as cur:
            stored = {str(key): int(value) for key, value in await cur.fetchall()}
        self._journal_bytes = stored.get("journal_bytes", 0)
        self._journal_trimmed = stored.get("journal_trimmed", 0)
        self._journal_entries = stored.get("journal_entries", 0)
        if await journal_store.has_journal(db):
            await self._tally.load(db)
            self._tally_loaded = True
            await self._refresh_journal_info(db)
            if self._db is not None:
                flags = await db.execute_fetchall(
                    "SELECT EXISTS (SELECT 1 FROM journal_outcomes), "
                    "EXISTS (SELECT 1 FROM journal_steps WHERE step = 'replayed')"
                )
                for outcomes, replays in flags:
                    self._journal_outcomes, self._journal_replays = bool(outcomes), bool(replays)
                # Merged at the first commit: a lookup reads the tail whole until then.
                self._journal_merge_due = True
                self._journal_unmerged = None
        for lane in LANES:
            async with db.execute(f"SELECT max(last_seq) FROM {_TABLE[lane]}") as cur:
                row = await cur.fetchone()
                if row and row[0] is not None:
                    seq = max(seq, int(row[0]))
        self._seq = seq
        if self._db is not None:  # a read-only look appends nothing: no need for the ids to dedupe against
            await self._load_dedupe(db)
        async with db.execute("SELECT coalesce(sum(count), 0) FROM lane_telemetry") as cur:
            row = await cur.fetchone()
            self._telemetry_rows = int(row[0]) if row else 0
        async with db.execute("PRAGMA table_info(cursors)") as cur:
            has_frozen = "frozen_at" in {row[1] for row in await cur.fetchall()}
        query = (
            "SELECT sink, lane, acked, frozen_at FROM cursors"
            if has_frozen
            else ("SELECT sink, lane, acked, NULL FROM cursors")
        )
        async with db.execute(query) as cur:
            for sink, lane, acked, frozen_at in await cur.fetchall():
                if lane in _TABLE:
                    self._cursors[(sink, lane)] = _LaneCursor(
                        acked=int(acked), frozen_at=None if frozen_at is None else int(frozen_at)
                    )
        for (_, lane), state in self._cursors.items():
            state.depth = await self._count_held(lane, state)
        async with db.execute("SELECT count(*) FROM dead_letters") as cur:
            row = await cur.fetchone()
            self.dead_letter_count = int(row[0]) if row else 0
        async with db.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='state'") as cur:
            has_state = await cur.fetchone() is not None
        if has_state:
            async with db.execute("SELECT key, value FROM state") as cur:
                self._state = {str(key): str(value) for key, value in await cur.fetchall()}
        await self._load_sequencing(db)
        await self._refresh_size()

    async def _load_sequencing(self, db: aiosqlite.Connection) -> None:
        """The held events (in arrival order) and the remembered releases, from their tables."""
        async with db.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name IN ('held', 'released_orders')"
        ) as cur:
            tables = {str(row[0]) for row in await cur.fetchall()}
        self._held, self._released = {}, {}
        if "held" in tables:
            query = "SELECT id, work_order, type, lane, subject, arrived, body FROM held ORDER BY n"
            async with db.execute(query) as cur:
                async for id_, work_order, type_, lane, subject, arrived, body in cur:
                    held = _Held(str(id_), str(work_order), str(type_), lane, subject, float(arrived), bytes(body))
                    self._held.setdefault(held.work_order, []).append(held)
        if "released_orders" in tables:
            async with db.execute("SELECT work_order, type, time FROM released_orders") as cur:
                async for work_order, type_, when in cur:
                    self._released.setdefault(str(work_order), {})[str(type_)] = float(when)

    async def _load_dedupe(self, db: aiosqlite.Connection) -> None:
        """The ids accepted within the dedupe window, newest first up to the bound, from the dedupe table."""
        window, max_ids = self._dedupe_settings
        stored: dict[str, float] = {}
        async with db.execute("SELECT key, value FROM meta WHERE key IN ('dedupe_window', 'dedupe_max_ids')") as cur:
            stored = {str(key): float(value) for key, value in await cur.fetchall()}
        if window is None:
            window = stored.get("dedupe_window", DEDUPE_WINDOW)
        if max_ids is None:
            max_ids = int(stored.get("dedupe_max_ids", DEDUPE_MAX_IDS))
        recent = self._recent_ids = RecentIds(max_ids, window)
        async with db.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='dedupe'") as cur:
            has_table = await cur.fetchone() is not None
        groups: list[tuple[float, list[str]]] = []
        if has_table:
            taken = 0
            async with db.execute(
                "SELECT time, ids FROM dedupe WHERE time >= ? ORDER BY n DESC", (time.time() - window,)
            ) as cur:
                async for row_time, blob in cur:
                    ids = _ids_decoder.decode(blob)
                    groups.append((float(row_time), ids))
                    taken += len(ids)
                    if taken >= max_ids:
                        break
        if groups or not has_table or not self._seq:
            for row_time, ids in reversed(groups):
                recent.remember(ids, row_time)
            recent.trim(time.time())
            return
        # A file from before the dedupe table: the ids still buffered, remembered from now on.
        found: list[tuple[int, str, float]] = []
        for lane in ("transaction", "operational"):
            async with db.execute(f"SELECT events FROM {_TABLE[lane]} ORDER BY first_seq DESC") as cur:
                taken = 0
                async for (blob,) in cur:
                    events = unpack_segment(blob)
                    found.extend((event.seq, event.id, event.enqueued) for event in events)
                    taken += len(events)
                    if taken >= max_ids:
                        break
        found.sort()
        for _, event_id, enqueued in found[-max_ids:]:
            recent.remember([event_id], enqueued)
        if found and self._commit_task is None and self._reader is not None and self._db is not None:
            self._pending.dedupe.extend(recent.order)
            self._pending.dedupe_time = time.time()

    async def close(self) -> None:
        """Commit what is pending, persist cursors, close the file."""
        if self._reader is None and self._db is None:
            return
        if self._commit_task is None:  # read-only
            await self._disconnect()
            self._unlock()
            return
        self._closing = True
        self._wake.set()
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await self._commit_task
        finally:
            self._commit_task = None
            for event in self._new_data.values():
                event.set()
            await self._disconnect()
            self._unlock()

    async def _check_integrity(self) -> str | None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return None
        try:
            # Read-only: a read-write connection would checkpoint the -wal into the suspect file on
            # close and delete it, destroying the evidence the quarantine must keep byte for byte.
            uri = f"file:{self.path}?mode=ro"
            async with aiosqlite.connect(uri, uri=True) as db, db.execute("PRAGMA quick_check") as cur:
                rows = list(await cur.fetchall())
        except sqlite3.DatabaseError as exc:
            return f"{type(exc).__name__}: {exc}"
        result = "; ".join(str(r[0]) for r in rows[:5])
        return None if result == "ok" else f"quick_check: {result}"

    def _quarantine(self, reason: str) -> dict[str, Any]:
        """Move the file and its -wal/-shm aside, byte for byte; never delete."""
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        moved_to = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        suffix_n = 1
        while moved_to.exists():  # a second quarantine within the same second
            suffix_n += 1
            moved_to = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{suffix_n}")
        tail = moved_to.name.removeprefix(self.path.name)
        size = self.path.stat().st_size
        self.path.rename(moved_to)
        for suffix in ("-wal", "-shm"):
            extra = self.path.with_name(self.path.name + suffix)
            if extra.exists():
                extra.rename(self.path.with_name(f"{self.path.name}{suffix}{tail}"))
        log.error(
            "Buffer file is corrupt; moved aside and starting on a fresh file",
            extra={"path": str(self.path), "moved_to": str(moved_to), "reason": reason},
        )
        return {"path": str(self.path), "moved_to": str(moved_to), "reason": reason, "size_bytes": size}

    async def _quarantine_live(self, reason: str) -> None:
        """Corruption seen while running: move the file aside and go on with a fresh one.

        What is only in the moved file stays there (for an operator, never deleted);
        the in-memory state carries on: the sequence never goes back, cursors keep
        their positions, recent ids keep deduplicating, state keys are written again,
        and whatever was not committed yet is written to the fresh file.
        """
        self._healthy.clear()
        self._generation += 1
        try:
            writer, reader = self._db, self._reader
            self._db = self._reader = None
            if writer is not None:
                with contextlib.suppress(Exception):
                    await writer.close()  # the reader still holds the file: no checkpoint into it
            info = self._quarantine(reason) if self.path.exists() else None
            if reader is not None:
                with contextlib.suppress(Exception):
                    await reader.close()  # read-only: never checkpoints nor deletes the WAL
            await self._connect()
            self._decoded.clear()
            self._telemetry_rows = 0
            self.dead_letter_count = 0
            for key, state in self._cursors.items():
                state.depth = 0
                self._dirty_cursors.add(key)
            self._pending.state.update({key: value for key, value in self._state.items()})
            # What the sequencing guard holds and remembers lives on in the fresh file too.
            queued_held = {entry.id for entry in self._pending.held_add}
            self._pending.held_add[:0] = [
                entry for entries in self._held.values() for entry in entries if entry.id not in queued_held
            ]
            self._pending.released.extend(
                (work_order, type_, when) for work_order, seen in self._released.items() for type_, when in seen.items()
            )
            # The fresh file remembers what the damaged one did: a duplicate stays one after a restart.
            queued = set(self._pending.dedupe)
            self._pending.dedupe[:0] = [i for i in self._recent_ids.order if i not in queued]
            self._pending.dedupe_time = time.time()
            self._dedupe_settings_saved = False
            self._pending.count += 1
            self._size_bytes = 0
            self._journal_bytes = 0  # the journal stays with the moved file
            self._tally = OutcomeTally()
            self._journal_entries = 0
            self._journal_unmerged = None
            self._journal_info = {"entries": 0, "oldest_committed": None}
            if info is not None:
                self.quarantined = info
                self.quarantines.append(info)
                self.on_quarantine.set()
        finally:
            self._corrupt = None
            self._healthy.set()
            for event in self._new_data.values():
                event.set()

    def _saw_corruption(self, exc: BaseException) -> None:
        """A read hit a damaged page: the commit loop moves the file aside."""
        if self._corrupt is None and self._commit_task is not None:
            self._corrupt = f"{type(exc).__name__}: {exc}"
            log.error("Buffer file is corrupt", extra={"error": str(exc)})
            self._wake.set()

    # --- configuration --------------------------------------------------------------------------

    async def configure_sinks(self, sinks: Mapping[str, Iterable[Lane]]) -> None:
        """The sinks of the current config and their lanes (the agent calls this at start).

        A cursor of a sink not in ``sinks``, or of a lane its sink no longer takes, is
        orphaned: it keeps the backlog it has now (``stats`` lists it as orphaned until
        ``purge``) but holds nothing appended from here on. A sink or lane that comes
        back takes its cursor up again.
        """
        self._configured = {name: frozenset(lanes) for name, lanes in sinks.items()}
        if self._db is not None:
            await self._apply_configuration()

    async def _apply_configuration(self) -> None:
        configured = self._configured
        assert configured is not None
        for key, state in self._cursors.items():
            sink, lane = key
            taken = lane in configured.get(sink, ())
            if taken and state.frozen_at is not None:
                state.frozen_at = None
                state.depth = await self._count_held(lane, state)
                self._dirty_cursors.add(key)
                log.info("Sink takes its lane again; its cursor resumes", extra={"sink": sink, "lane": lane})
            elif not taken and state.frozen_at is None:
                state.frozen_at = self._seq
                self._dirty_cursors.add(key)
                if state.depth:
                    log.warning(
                        "Backlog of a sink or lane no longer configured is kept as orphaned until purged",
                        extra={"sink": sink, "lane": lane, "depth": state.depth},
                    )
        if self._dirty_cursors:
            self._wake.set()

    def _is_orphaned(self, sink: str, lane: Lane, state: _LaneCursor, configured: Mapping[str, Any] | None) -> bool:
        if state.frozen_at is not None:
            return True
        if configured is None:
            return False
        if sink not in configured:
            return True
        lanes = configured[sink]
        return lanes is not None and lane not in lanes

    # --- writing --------------------------------------------------------------------------------

    @property
    def refusing_writes(self) -> str | None:
        """Why the buffer refuses writes right now (disk full, size cap), or None."""
        return self._refusing

    async def wait_writable(self) -> None:
        """Back-pressure for sources: returns when the buffer takes more appends."""
        while not self._writable.is_set():
            await self._writable.wait()
        if self._commit_error is not None:
            raise BufferError(f"buffer commit failed: {self._commit_error}") from self._commit_error

    async def set_max_page_count(self, pages: int) -> int:
        """Cap the file at ``pages`` pages (SQLite ``max_page_count``); returns the cap in force.

        An operational knob (a hard ceiling below the disk's own, e.g. on a shared
        volume; SQLite never sets it below the file's current size) that also gives
        tests a genuine SQLITE_FULL. It applies to the writer at once, also in the
        middle of a transaction, and to the fresh file after a quarantine.
        """
        self._page_limit = pages
        db = self._db
        if db is None:
            return pages
        async with db.execute(f"PRAGMA max_page_count={int(pages)}") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else pages

    def append(
        self,
        events: Sequence[CloudEvent],
        dead_letters: Sequence[DeadLetter] = (),
        contexts: Mapping[str, dict[str, Any]] | None = None,
    ) -> asyncio.Future[None]:
        """Queue events (and dead letters made before any sink) for the next commit.

        Assigns each event its ``sequence`` and encodes it, once. The returned future
        completes when the commit holding them is durable: acknowledge a source (202,
        PLC handshake) only after awaiting it. ``contexts`` (event id -> what triggered
        a rule's event, ``RuleOutput.contexts``) goes into the delivery journal.
        """
        if self._commit_task is None or self._closing:
            raise BufferError("buffer is not open")
        if self._guard:
            return self._append_guarded(events, dead_letters, contexts)
        pending = self._pending
        now = time.time()
        seq = self._seq
        rows = pending.rows
        recent = self._recent_ids
        seen, fresh = recent.ids, recent.order
        remembered = pending.dedupe
        before = len(remembered)
        encode = encode_event
        journal = pending.journal.keys if self.journal_enabled else None
        for event in events:
            lane = event.lane
            event_id = event.id
            if lane != "telemetry":
                if event_id in seen:
                    # The same fact again (a reconnect's replay, an MES retry, a re-read): stored once.
                    self.duplicates_suppressed += 1
                    continue
                seen.add(event_id)
                fresh.append(event_id)
                remembered.append(event_id)
                seq += 1
                event.sequence = f"{seq:020d}"
                body = encode(event)
                rows[lane].append(BufferedEvent(seq, lane, event.type, event_id, body, now))
                if journal is not None:
                    journal[seq] = _entry_keys(event, contexts)
                continue
            seq += 1
            event.sequence = f"{seq:020d}"  # format_sequence, inlined on the hot path
            rows[lane].append(BufferedEvent(seq, lane, event.type, event_id, encode(event), now))
        if len(remembered) > before:
            recent.groups.append([now, len(remembered) - before])
            pending.dedupe_time = now
        recent.trim(now)
        self._seq = seq
        pending.dead.extend(dead_letters)
        pending.count += len(events) + len(dead_letters)
        return self._queued(pending)

    def _append_guarded(
        self,
        events: Sequence[CloudEvent],
        dead_letters: Sequence[DeadLetter],
        contexts: Mapping[str, dict[str, Any]] | None,
    ) -> asyncio.Future[None]:
        """``append`` with ``[[sequencing]]`` entries: holds and releases as events arrive.

        A separate loop so a config without sequencing pays nothing per event.
        """
        pending = self._pending
        now = time.time()
        rows = pending.rows
        recent = self._recent_ids
        seen, fresh = recent.ids, recent.order
        remembered = pending.dedupe
        before = len(remembered)
        guards, releasing = self._guard, self._releasing
        journal = pending.journal if self.journal_enabled else None
        for event in events:
            lane = event.lane
            event_id = event.id
            if lane != "telemetry":
                if event_id in seen:
                    self.duplicates_suppressed += 1
                    continue
                seen.add(event_id)
                fresh.append(event_id)
                remembered.append(event_id)
            type_ = event.type
            guard = guards.get(type_)
            if guard is not None:
                work_order = work_order_of(event.data, event.subject)
                if work_order is not None and not self._is_released(work_order, guard):
                    event.sequence = None
                    held = _Held(event_id, work_order, type_, lane, event.subject, now, encode_event(event))
                    self._held.setdefault(work_order, []).append(held)
                    pending.held_add.append(held)
                    if journal is not None:
                        # No body (the held table has it until release): no step either, see ``released``.
                        journal.unsequenced.append(_held_entry(event, now, contexts))
                    continue
            self._seq += 1
            event.sequence = f"{self._seq:020d}"
            body = encode_event(event)
            rows[lane].append(BufferedEvent(self._seq, lane, type_, event_id, body, now))
            if journal is not None and lane != "telemetry":
                journal.keys[self._seq] = _entry_keys(event, contexts)
            if type_ in releasing:
                work_order = work_order_of(event.data, event.subject)
                if work_order is not None:
                    self._release(work_order, type_, now)
        if len(remembered) > before:
            recent.groups.append([now, len(remembered) - before])
            pending.dedupe_time = now
        recent.trim(now)
        pending.dead.extend(dead_letters)
        pending.count += len(events) + len(dead_letters)
        return self._queued(pending)

    def _is_released(self, work_order: str, guard: _Guard) -> bool:
        seen = self._released.get(work_order)
        return seen is not None and not guard.after.isdisjoint(seen)

    def _release(self, work_order: str, after_type: str, now: float) -> None:
        """An ``after`` event of ``work_order`` was appended: remember it; its held events follow it."""
        self._released.setdefault(work_order, {})[after_type] = now
        pending = self._pending
        pending.released.append((work_order, after_type, now))
        held = self._held.get(work_order)
        if not held:
            return
        kept: list[_Held] = []
        for entry in held:
            guard = self._guard.get(entry.type)
            if guard is None or after_type in guard.after:
                self._to_lane(entry, now)
            else:
                kept.append(entry)
        if kept:
            self._held[work_order] = kept
        else:
            del self._held[work_order]

    def _to_lane(self, entry: _Held, now: float) -> None:
        """A held event goes into its lane, under its id, with a fresh sequence (after what released it)."""
        self._seq += 1
        event = msgspec.json.decode(entry.body)
        event["sequence"] = f"{self._seq:020d}"
        body = msgspec.json.encode(event)
        self._pending.rows[entry.lane].append(BufferedEvent(self._seq, entry.lane, entry.type, entry.id, body, now))
        self._pending.held_drop.append(entry.id)
        self._pending.count += 1
        self._journal_sequenced(event, entry.lane, self._seq, RELEASED, now, None)

    def _journal_sequenced(
        self,
        event: dict[str, Any],
        lane: Lane,
        seq: int,
        kind: int,
        now: float,
        step: str | None,
        detail: str | None = None,
    ) -> None:
        """A decoded event went into its lane (released, replayed): journaled again there, plus a step."""
        if not self.journal_enabled or lane == "telemetry":
            return
        journal = self._pending.journal
        journal.keys[seq] = decoded_keys(event, kind)
        if step is not None:
            journal.steps.append((str(event["id"]), now, step, None, None, None, detail))

    def _journal_settled(self, sink: str, settled: _Settled) -> None:
        """A batch's attempts and acknowledgements, as journal rows for the next commit.

        An acknowledgement is an event's delivery when no other sink of its lane has
        acknowledged it yet (its cursor is still before it): that makes it unconfirmed
        until the ERP's outcome arrives.
        """
        if not (settled.acked or settled.ranges):
            return
        now = time.time()
        journal = self._pending.journal
        journal.ranges.extend(
            (lane, first, last, now, step, sink, status) for lane, first, last, step, status in settled.ranges
        )
        if settled.referenced:
            journal.steps.extend((id_, now, "acked", sink, "ok", ref, None) for id_, ref in settled.referenced)
        others: dict[str, list[_LaneCursor]] = {}
        for (other, other_lane), state in self._cursors.items():
            if other != sink:
                others.setdefault(other_lane, []).append(state)
        for lane, seq, type_, event_id in settled.acked:
            peers = others.get(lane)
            if peers and any(state.acked >= seq for state in peers):
                continue  # another sink delivered it first
            journal.acked.append((lane, seq, type_, event_id, now))
        self._pending.count += 1
        self._wake.set()

    def held_summary(self) -> HeldStats:
        """What the sequencing guard holds right now (``stats``, ``/status``, metrics)."""
        now = time.time()
        stats = HeldStats()
        oldest: float | None = None
        for entries in self._held.values():
            for entry in entries:
                stats.count += 1
                name = entry.type.removeprefix(TYPE_PREFIX)
                stats.types[name] = stats.types.get(name, 0) + 1
                oldest = entry.arrived if oldest is None else min(oldest, entry.arrived)
        if oldest is not None:
            stats.oldest_age_seconds = round(max(0.0, now - oldest), 3)
        return stats

    def _expire_held(self, now: float) -> None:
        """Held past ``hold``: a dead letter (sink ``-``); a type no longer guarded: into its lane."""
        pending = self._pending
        for work_order in list(self._held):
            kept: list[_Held] = []
            for entry in self._held[work_order]:
                guard = self._guard.get(entry.type)
                if guard is None:
                    self._to_lane(entry, now)
                elif now - entry.arrived >= guard.hold:
                    reason = guard.reason.format(work_order)
                    pending.dead.append(
                        DeadLetter(entry.id, NO_SINK, reason, entry.type, entry.subject, entry.lane, now, entry.body)
                    )
                    pending.held_drop.append(entry.id)
                    pending.count += 1
                    log.warning(
                        "Held event became a dead letter: its work order was not released in time",
                        extra={"id": entry.id, "type": entry.type, "work_order": work_order},
                    )
                else:
                    kept.append(entry)
            if kept:
                self._held[work_order] = kept
            else:
                del self._held[work_order]
        if self._released:
            limit = now - self._remember_releases
            forgotten = False
            for work_order in list(self._released):
                seen = self._released[work_order]
                for type_ in [type_ for type_, when in seen.items() if when < limit]:
                    del seen[type_]
                    forgotten = True
                if not seen:
                    del self._released[work_order]
            if forgotten:
                pending.released_before = limit
                pending.count += 1
        if pending.count:
            self._wake.set()

    async def _write_sequencing(self, db: aiosqlite.Connection, pending: _Pending) -> None:
        """Held and released events and remembered releases: in the transaction of the events they go with."""
        dropped = set(pending.held_drop)
        # Held and released within one group: never written (the delete below finds nothing).
        added = [h for h in pending.held_add if h.id not in dropped]
        if added:
            await db.executemany(
                "INSERT INTO held(id, work_order, type, lane, subject, arrived, body) VALUES (?,?,?,?,?,?,?)",
                [(h.id, h.work_order, h.type, h.lane, h.subject, h.arrived, h.body) for h in added],
            )
        if pending.held_drop:
            await db.executemany("DELETE FROM held WHERE id = ?", [(id_,) for id_ in pending.held_drop])
        if pending.released:
            await db.executemany(
                "INSERT INTO released_orders(work_order, type, time) VALUES (?,?,?) "
                "ON CONFLICT(work_order, type) DO UPDATE SET time=excluded.time",
                pending.released,
            )
        if pending.released_before:
            await db.execute("DELETE FROM released_orders WHERE time < ?", (pending.released_before,))

    def _queued(self, pending: _Pending) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pending.waiters.append(future)
        if pending.count >= self.max_pending_rows:
            self._writable.clear()
        self._wake.set()
        return future

    def dedupe_status(self) -> dict[str, float | int | None]:
        """The dedupe window for ``/status``: ids remembered, the oldest one's age, the window and the bound."""
        recent = self._recent_ids
        now = time.time()
        return {
            "ids": len(recent),
            "oldest_age_seconds": round(now - recent.oldest(now), 3) if len(recent) else None,
            "window_seconds": recent.window,
            "max_ids": recent.capacity,
        }

    # --- state: small durable key/value pairs for other components --------------------------------

    async def load_state(self, key: str) -> str | None:
        """The value last saved under ``key`` (saved in this run or an earlier one), or None."""
        return self._state.get(key)

    def save_state(self, key: str, value: str | None) -> asyncio.Future[None]:
        """Save ``value`` under ``key`` (None deletes it) in the next group commit.

        The future resolves once it is durable, in the same transaction as the events
        appended before it (e.g. the OPC UA source's subscription ids with its readings).
        """
        if self._commit_task is None or self._closing:
            raise BufferError("buffer is not open")
        if value is None:
            self._state.pop(key, None)
        else:
            self._state[key] = value
        pending = self._pending
        pending.state[key] = value
        pending.count += 1
        return self._queued(pending)

    # --- the commit loop ------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._corrupt is not None:
                reason, self._corrupt = self._corrupt, None
                if not await self._try_quarantine(reason):
                    continue
            pending, self._pending = self._pending, _Pending()
            if self._refusing is None:
                # Sources may fill the next group while this one commits: at most two groups in memory.
                self._writable.set()
            try:
                await self._commit(pending)
            except sqlite3.Error as exc:
                await self._commit_failed(pending, exc)
                continue
            for future in pending.waiters:
                if not future.done():
                    future.set_result(None)
            if pending.count:
                for event in self._new_data.values():
                    event.set()
            if self._written_since_size_check >= self._size_check_bytes:
                # A burst (a webhook at full speed) must not overshoot max_size_mb by a second's worth.
                try:
                    await self.maintain()
                except sqlite3.Error as exc:  # the periodic upkeep tries again within a second
                    log.debug("Size check after a commit failed", extra={"error": str(exc)})
            if self._closing and not self._pending.count and not self._dirty_cursors:
                return

    async def _try_quarantine(self, reason: str) -> bool:
        try:
            await self._quarantine_live(reason)
        except (OSError, sqlite3.Error) as exc:
            log.error("Corrupt buffer file could not be moved aside; retrying", extra={"error": str(exc)})
            self._corrupt = reason
            self._refusing = f"buffer file is corrupt and could not be replaced: {exc}"
            self._writable.clear()
            await asyncio.sleep(self.commit_retry_interval)
            self._wake.set()
            return False
        return True

    async def _commit_failed(self, pending: _Pending, exc: sqlite3.Error) -> None:
        """Keep what did not commit and retry: a full disk clears up, a transaction must not be lost."""
        # Put the failed work back in front of anything appended since, in order.
        newer, self._pending = self._pending, pending
        pending.absorb(newer)
        if is_corruption(exc):
            # The file is damaged: everything of this group goes to the fresh file, also what
            # already committed into the damaged one (its waiters were not told yet).
            pending.done = dict.fromkeys(LANES, 0)
            if await self._try_quarantine(f"{type(exc).__name__}: {exc}"):
                self._wake.set()
            return
        self._refusing = f"commit failed: {exc}"
        self._writable.clear()
        log.error("Buffer commit failed; writes refused until it succeeds", extra={"error": str(exc)})
        if self._closing:
            self._commit_error = exc
            for future in pending.waiters:
                if not future.done():
                    future.set_exception(BufferError(f"buffer commit failed: {exc}"))
            raise BufferError(f"buffer commit failed while closing: {exc}") from exc
        await asyncio.sleep(self.commit_retry_interval)
        self._wake.set()

    def _chunks(self, pending: _Pending) -> list[dict[Lane, list[BufferedEvent]]]:
        """What is left of the group, split into bounded transactions (WAL size), in order."""
        chunks: list[dict[Lane, list[BufferedEvent]]] = []
        current: dict[Lane, list[BufferedEvent]] = {}
        size = 0
        for lane in LANES:
            rows = pending.rows[lane]
            start = pending.done[lane]
            while start < len(rows):
                take = min(len(rows) - start, self.max_rows_per_commit - size)
                current.setdefault(lane, []).extend(rows[start : start + take])
                start += take
                size += take
                if size >= self.max_rows_per_commit:
                    chunks.append(current)
                    current, size = {}, 0
        chunks.append(current)
        return chunks

    async def _commit(self, pending: _Pending) -> None:
        db = self._db
        assert db is not None
        chunks = self._chunks(pending)
        for index, chunk in enumerate(chunks):
            last = index == len(chunks) - 1
            txn = _Txn()
            trimmed = False
            await db.execute("BEGIN IMMEDIATE")
            written: set[tuple[str, Lane]] = set()
            try:
                journal_bytes, journaled = await self._insert(db, chunk, txn, pending.journal.keys)
                changes: TallyChanges | None = None
                trimmed_entries = 0
                merge_more: bool | None = None
                merged_upto = 0
                if last:
                    if pending.dead:
                        await self._insert_dead(db, pending.dead)
                    changes = TallyChanges()
                    if self.journal_enabled:
                        added, held = await self._journal_extras(db, pending, changes)
                        journal_bytes += added
                        journaled += held
                    if self._journal_trim_due:
                        cut = await self._trim_journal(db, changes)
                        trimmed_entries, journal_bytes = cut.entries, journal_bytes - cut.bytes
                    if self._journal_unindexed >= journal_store.MERGE_EVERY or self._journal_merge_due:
                        unmerged = None if self._journal_unmerged is None else [*self._journal_unmerged, *txn.journaled]
                        index_rows, merge_more, merged_upto = await journal_store.merge_keys(db, unmerged)
                        journal_bytes += index_rows * journal_store.KEY_BYTES
                        await journal_store.compact_keys(db)
                    await self._admin_changes(db, pending, txn)
                    await self._write_sequencing(db, pending)
                    trimmed = await self._write_dedupe(db, pending)
                    written = await self._write_cursors(db)
                    await self._delete_delivered(db, txn)
                    await self._evict_telemetry(db, txn)
                meta: list[tuple[str, float | str]] = [("last_seq", self._seq)]
                if journal_bytes:
                    meta.append(("journal_bytes", max(0, self._journal_bytes + journal_bytes)))
                if journaled or trimmed_entries:
                    meta.append(("journal_entries", max(0, self._journal_entries + journaled - trimmed_entries)))
                if trimmed_entries:
                    meta.append(("journal_trimmed", self._journal_trimmed + trimmed_entries))
                if changes is not None and changes.deltas:
                    meta.append(("journal_tally", self._tally.with_deltas(changes)))
                await db.executemany(
                    "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                    meta,
                )
                await db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await db.execute("ROLLBACK")
                self._dirty_cursors.update(written)  # the retry writes these positions again
                raise
            for lane, events in chunk.items():
                pending.done[lane] += len(events)
            self._journal_bytes = max(0, self._journal_bytes + journal_bytes)
            self._journal_trimmed += trimmed_entries
            self._journal_entries = max(0, self._journal_entries + journaled - trimmed_entries)
            self._journal_unindexed += journaled
            if self._journal_unmerged is not None:
                self._journal_unmerged.extend(txn.journaled)
            if merge_more is not None:
                self._journal_unindexed = journal_store.MERGE_EVERY if merge_more else 0
                self._journal_merge_due = merge_more
                if merge_more:
                    self._wake.set()
                elif self._journal_unmerged is None:
                    self._journal_unmerged = []  # the file's tail is indexed: the writer's list takes over
                else:
                    self._journal_unmerged = [s for s in self._journal_unmerged if s.first_seq > merged_upto]
            if changes is not None:
                self._tally.apply(changes)
            if last:
                if pending.journal.outcomes:
                    self._journal_outcomes = True
                if any(step[2] == "replayed" for step in pending.journal.steps):
                    self._journal_replays = True
                self._dedupe_settings_saved = True
                if trimmed:
                    self._dedupe_trimmed_at = time.time()
            self._applied(txn)
        self.dead_letter_count += len(pending.dead) - len(set(pending.dead_delete))
        if self._refusing is not None and self._refusing.startswith("commit failed"):
            log.info("Buffer commits succeed again; writes accepted")
            self._refusing = None
        if self._refusing is None and self._pending.count < self.max_pending_rows:
            self._writable.set()

    def _applied(self, txn: _Txn) -> None:
        """A transaction committed: now the counters and readers may count its rows."""
        self._telemetry_rows += txn.telemetry_delta
        evicted = txn.evicted
        for (_, lane), state in self._cursors.items():
            rows = txn.inserted.get(lane)
            if rows:
                if state.frozen_at is None and state.acked < rows[0].seq:
                    state.depth += len(rows)
                else:
                    state.depth += sum(1 for event in rows if state.holds(event.seq))
            if evicted and lane == "telemetry":
                state.depth = max(0, state.depth - sum(1 for event in evicted if state.holds(event.seq)))
        if evicted:
            self.evictions.extend(_evictions_of(evicted))
            self.on_eviction.set()

    async def _insert(
        self,
        db: aiosqlite.Connection,
        chunk: dict[Lane, list[BufferedEvent]],
        txn: _Txn,
        keys: Mapping[int, EventKeys],
    ) -> tuple[int, int]:
        """The chunk's segments; returns the estimated bytes the journal's copies of them take, and how many
        events those hold."""
        now = time.time()
        journal_bytes = journaled = 0
        for lane, events in chunk.items():
            if not events:
                continue
            segments = [
                events[start : start + _SEGMENT_MAX_EVENTS] for start in range(0, len(events), _SEGMENT_MAX_EVENTS)
            ]
            rows = [(seg[0].seq, seg[-1].seq, len(seg), now, pack_segment(seg)) for seg in segments]
            await db.executemany(
                f"INSERT INTO {_TABLE[lane]}(first_seq, last_seq, count, enqueued, events) VALUES (?,?,?,?,?)", rows
            )
            written = sum(len(row[4]) for row in rows)
            self._written_since_size_check += written
            if self.journal_enabled and lane != "telemetry":
                # The journal is the segments themselves (the same compressed bytes, written once more) and,
                # per event, only the keys the event does not carry.
                copies = []
                for row, seg in zip(rows, segments, strict=True):
                    columns, indexed = journal_store.pack_columns(seg, keys)
                    copies.append((row[0], row[1], lane, now, row[4], columns))
                    txn.journaled.append(indexed)
                await db.executemany(INSERT_SEGMENT, copies)
                journal_bytes += sum(journal_store.segment_bytes(len(row[4]) + len(row[5])) for row in copies)
                journaled += len(events)
            txn.inserted[lane] = events
            if lane == "telemetry":
                # Counted before eviction so the cap holds right after the commit that crosses it.
                txn.telemetry_delta += len(events)
        return journal_bytes, journaled

    async def _trim_journal(self, db: aiosqlite.Connection, changes: TallyChanges) -> journal_store.Trimmed:
        """One bounded chunk of retention and size trimming; the commit loop comes back while more is due.

        Past ``journal_max_bytes`` it trims down to 95 % of it, so a journal at its bound is
        trimmed in chunks now and then, not a few rows on every commit.
        """
        excess = 0
        if self._journal_bytes > self.journal_max_bytes or self._journal_shrinking:
            excess = self._journal_bytes - int(0.95 * self.journal_max_bytes)
        self._journal_shrinking = excess > 0
        trimmed = await journal_store.trim(db, time.time() - self.journal_retention, excess, changes)
        self._journal_trim_due = trimmed.more or (excess - trimmed.bytes > 0 and trimmed.entries > 0)
        if self._journal_trim_due:
            self._wake.set()
        elif trimmed.entries:
            log.debug("Journal trimmed", extra={"entries": trimmed.entries, "bytes": trimmed.bytes})
        return trimmed

    async def _journal_extras(
        self, db: aiosqlite.Connection, pending: _Pending, changes: TallyChanges
    ) -> tuple[int, int]:
        """Dead letters as journal steps (and entries, when made before any sink), the queued steps and
        ranges, first deliveries and outcomes.

        Returns the estimated bytes added and how many entries were added (held ones).
        """
        journal = pending.journal
        steps: list[journal_store.StepRow] = []
        unsequenced = list(journal.unsequenced)
        for dead in pending.dead:
            if dead.lane == "telemetry":
                continue
            if dead.sink == NO_SINK:
                unsequenced.append(held_row(dead.id, dead.type, dead.body, dead.time, dead.context))
            sink = None if dead.sink == NO_SINK else dead.sink
            steps.append((dead.id, dead.time, "dead_letter", sink, None, None, dead.reason))
        held = await journal_store.insert_unsequenced(db, unsequenced)
        added = journal_store.held_bytes(held) + sum(len(row[6]) for row in unsequenced)
        steps.extend(journal.steps)
        if steps:
            await db.executemany(journal_store.INSERT_STEP, steps)
            added += journal_store.step_bytes(steps)
        if journal.ranges:
            await db.executemany(journal_store.INSERT_RANGE, journal.ranges)
            added += journal_store.RANGE_BYTES * len(journal.ranges)
        if journal.acked:
            redelivered: set[str] = set()
            if self._journal_replays:
                redelivered = await journal_store.redelivered(db, journal.acked)
            await journal_store.count_deliveries(db, journal.acked, redelivered, changes, self._journal_outcomes)
        if journal.outcomes:
            added += await journal_store.write_outcomes(db, journal.outcomes, changes)
        return added, held

    async def _insert_dead(self, db: aiosqlite.Connection, dead: list[DeadLetter]) -> None:
        await db.executemany(
            "INSERT INTO dead_letters(id, sink, reason, type, subject, lane, time, body, context) "
            "VALUES (?,?,?,?,?,?,?,?,?)",
            [
                (d.id, d.sink, d.reason, d.type, d.subject, d.lane, d.time, d.body, _context_text(d.context))
                for d in dead
            ],
        )

    async def _admin_changes(self, db: aiosqlite.Connection, pending: _Pending, txn: _Txn) -> None:
        """Replays, purges and state: in the same transaction as the events they go with."""
        if pending.dead_delete:
            await db.executemany("DELETE FROM dead_letters WHERE n = ?", [(n,) for n in pending.dead_delete])
        if pending.dead_reason:
            await db.executemany("UPDATE dead_letters SET reason = ?, time = ? WHERE n = ?", pending.dead_reason)
        if pending.cursor_delete:
            await db.executemany("DELETE FROM cursors WHERE sink = ? AND lane = ?", pending.cursor_delete)
        for lane, seq in pending.lane_clear.items():
            if any(cursor_lane == lane for _, cursor_lane in self._cursors):
                continue  # a sink took the lane up meanwhile: the usual rule decides
            if lane == "telemetry":
                async with db.execute(
                    "SELECT coalesce(sum(count), 0) FROM lane_telemetry WHERE last_seq <= ?", (seq,)
                ) as cur:
                    row = await cur.fetchone()
                txn.telemetry_delta -= int(row[0]) if row else 0
            await db.execute(f"DELETE FROM {_TABLE[lane]} WHERE last_seq <= ?", (seq,))
        if pending.state:
            await db.executemany(
                "DELETE FROM state WHERE key = ?", [(k,) for k, v in pending.state.items() if v is None]
            )
            await db.executemany(
                "INSERT INTO state(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                [(k, v) for k, v in pending.state.items() if v is not None],
            )

    async def _write_dedupe(self, db: aiosqlite.Connection, pending: _Pending) -> bool:
        """The group's new ids as one row; the rows whose every id left the window, deleted."""
        if not self._dedupe_settings_saved:
            recent = self._recent_ids
            await db.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                [("dedupe_window", recent.window), ("dedupe_max_ids", recent.capacity)],
            )
        if pending.dedupe:
            row = (pending.dedupe_time, _ids_encoder.encode(pending.dedupe))
            await db.execute("INSERT INTO dedupe(time, ids) VALUES (?, ?)", row)
        now = time.time()
        if now - self._dedupe_trimmed_at >= _DEDUPE_TRIM_INTERVAL:
            # A row's time is its newest id's: older than every id still remembered means none of it is.
            await db.execute("DELETE FROM dedupe WHERE time < ?", (self._recent_ids.oldest(now),))
            return True
        return False

    async def _write_cursors(self, db: aiosqlite.Connection) -> set[tuple[str, Lane]]:
        if not self._dirty_cursors:
            return set()
        keys, self._dirty_cursors = {key for key in self._dirty_cursors if key in self._cursors}, set()
        rows = [
            (sink, lane, self._cursors[(sink, lane)].acked, self._cursors[(sink, lane)].frozen_at)
            for sink, lane in keys
        ]
        await db.executemany(
            "INSERT INTO cursors(sink, lane, acked, frozen_at) VALUES (?,?,?,?) "
            "ON CONFLICT(sink, lane) DO UPDATE SET acked=excluded.acked, frozen_at=excluded.frozen_at",
            rows,
        )
        return keys

    def _deletable(self, lane: Lane) -> tuple[str, list[int]] | None:
        """The WHERE clause of the segments no cursor of ``lane`` holds any more, or None."""
        states = [state for (_, cursor_lane), state in self._cursors.items() if cursor_lane == lane]
        if not states:
            return None
        live = [state.acked for state in states if state.frozen_at is None]
        # Below every live cursor, or past every one when only orphaned cursors are left.
        clauses, params = ["first_seq <= ? AND last_seq <= ?"], [min(live) if live else self._seq] * 2
        for state in states:
            if state.frozen_at is not None and state.frozen_at > state.acked:
                # ... and outside the backlog (acked, frozen_at] an orphaned cursor keeps.
                clauses.append("NOT (first_seq <= ? AND last_seq > ?)")
                params.extend((state.frozen_at, state.acked))
        return " AND ".join(clauses), params

    async def _delete_delivered(self, db: aiosqlite.Connection, txn: _Txn) -> None:
        for lane in LANES:
            where = self._deletable(lane)
            if where is None:
                continue
            clause, params = where
            if lane == "telemetry":
                async with db.execute(
                    f"SELECT coalesce(sum(count), 0) FROM lane_telemetry WHERE {clause}", params
                ) as cur:
                    row = await cur.fetchone()
                txn.telemetry_delta -= int(row[0]) if row else 0
            await db.execute(f"DELETE FROM {_TABLE[lane]} WHERE {clause}", params)

    async def _evict_telemetry(self, db: aiosqlite.Connection, txn: _Txn) -> None:
        """Oldest telemetry first, only when over the row cap; counted and reported."""
        excess = self._telemetry_rows + txn.telemetry_delta - self.telemetry_max_rows
        if excess <= 0:
            return
        # Evict a little more than needed so a steady overflow does not evict on every commit,
        # but a bounded amount per commit (the evicted events are decoded for the gap report).
        excess += max(1, self.telemetry_max_rows // 100)
        evicted: list[BufferedEvent] = []
        last = -1
        async with db.execute(
            "SELECT last_seq, events FROM lane_telemetry ORDER BY first_seq LIMIT ?", (1 + excess // 8,)
        ) as cur:
            async for last_seq, blob in cur:
                evicted.extend(unpack_segment(blob))
                last = int(last_seq)
                if len(evicted) >= min(excess, 20_000):
                    break
        if not evicted:
            return
        if len(evicted) < excess:
            self._wake.set()  # more to evict: next commit
        await db.execute("DELETE FROM lane_telemetry WHERE first_seq <= ?", (last,))
        txn.telemetry_delta -= len(evicted)
        txn.evicted.extend(evicted)

    # --- reading and acknowledging -------------------------------------------------------------

    def cursor(self, sink: str, lanes: Iterable[Lane]) -> DeliveryCursor:
        """The delivery cursor of ``sink``; a sink seen for the first time starts at the head."""
        return DeliveryCursor(self, sink, lanes)

    def _cursor_state(self, sink: str, lane: Lane) -> _LaneCursor:
        key = (sink, lane)
        state = self._cursors.get(key)
        if state is None:
            # A new sink takes events from now on; an old backlog belongs to the sinks that had it.
            state = _LaneCursor(acked=self._seq)
            self._cursors[key] = state
            self._dirty_cursors.add(key)
            self._wake.set()
        return state

    async def _read(self, sink: str, lanes: dict[Lane, _LaneCursor], limit: int) -> list[BufferedEvent]:
        db = self._reader
        if db is None or not self._healthy.is_set():
            return []
        generation = self._generation
        try:
            batch = await self._read_segments(db, lanes, limit)
        except (sqlite3.Error, ValueError) as exc:
            if is_corruption(exc):
                self._saw_corruption(exc)
                return []
            if generation != self._generation:
                return []  # the connection was replaced under this read
            raise
        # Rows read from a file that was moved aside meanwhile are not handed out.
        return batch if generation == self._generation else []

    async def _read_segments(
        self, db: aiosqlite.Connection, lanes: dict[Lane, _LaneCursor], limit: int
    ) -> list[BufferedEvent]:
        batch: list[BufferedEvent] = []
        for lane, state in lanes.items():
            if state.depth <= 0:
                continue
            table = _TABLE[lane]
            acked, frozen_at = state.acked, state.frozen_at
            # The segment holding acked+1 may start before it: begin at the last segment starting <= acked.
            async with db.execute(
                f"SELECT coalesce(max(first_seq), 0) FROM {table} WHERE first_seq <= ?", (acked,)
            ) as cur:
                row = await cur.fetchone()
            start = int(row[0]) if row else 0
            while len(batch) < limit:
                # A few segments per query: each can hold a thousand events, so fetching more
                # (aiosqlite iterates 64 rows at a time) would read megabytes to use one.
                async with db.execute(
                    f"SELECT first_seq, events FROM {table} WHERE first_seq >= ? ORDER BY first_seq LIMIT 2",
                    (start,),
                ) as cur:
                    rows = list(await cur.fetchall())
                if not rows:
                    break
                for first_seq, blob in rows:
                    if frozen_at is not None and first_seq > frozen_at:
                        break
                    events = self._segment(lane, first_seq, blob)
                    if frozen_at is None:
                        batch.extend(event for event in events if event.seq > acked)
                    else:
                        batch.extend(event for event in events if acked < event.seq <= frozen_at)
                if frozen_at is not None and int(rows[-1][0]) > frozen_at:
                    break
                start = int(rows[-1][0]) + 1
            if len(batch) >= limit:
                del batch[limit:]
                break
        return batch

    def _segment(self, lane: Lane, first_seq: int, blob: bytes) -> list[BufferedEvent]:
        """Decode a segment, remembering the last few: several sinks read the same ones."""
        key = (lane, first_seq)
        events = self._decoded.get(key)
        if events is None:
            events = unpack_segment(blob)
            self._decoded[key] = events
            if len(self._decoded) > 16:
                del self._decoded[next(iter(self._decoded))]
        return events

    async def _wait_for_new(self, cursor: DeliveryCursor) -> None:
        event = self._new_data.setdefault(cursor.sink, asyncio.Event())
        event.clear()
        if cursor.depth() > 0 or self._closing:
            return
        await event.wait()

    def _advance(
        self,
        sink: str,
        lanes: dict[Lane, _LaneCursor],
        advance: dict[Lane, int],
        batch: Sequence[BufferedEvent],
        dead: list[DeadLetter],
    ) -> None:
        for lane, seq in advance.items():
            state = lanes[lane]
            if seq <= state.acked:
                continue
            passed = sum(1 for event in batch if event.lane == lane and state.acked < event.seq <= seq)
            state.acked = seq
            state.depth = max(0, state.depth - passed)
            self._dirty_cursors.add((sink, lane))
        if dead:
            self._pending.dead.extend(dead)
            self._pending.count += len(dead)
        if advance or dead:
            self._wake.set()

    async def _recount(self) -> None:
        """Depths and the telemetry row count from the file (committed rows only)."""
        if self._reader is None:
            return
        try:
            async with self._reader.execute("SELECT coalesce(sum(count), 0) FROM lane_telemetry") as cur:
                row = await cur.fetchone()
            self._telemetry_rows = int(row[0]) if row else 0
            for (_, lane), state in self._cursors.items():
                state.depth = await self._count_held(lane, state)
        except (sqlite3.Error, ValueError) as exc:
            if is_corruption(exc):
                self._saw_corruption(exc)

    async def _count_held(self, lane: Lane, state: _LaneCursor) -> int:
        """Rows of ``lane`` the cursor still holds: after ``acked`` (and up to ``frozen_at``)."""
        db = self._reader
        assert db is not None
        low, high = state.acked, state.frozen_at
        if high is not None and high <= low:
            return 0
        table = _TABLE[lane]
        params: tuple[int, ...]
        if high is None:
            query, params = f"SELECT coalesce(sum(count), 0) FROM {table} WHERE first_seq > ?", (low,)
        else:
            query = f"SELECT coalesce(sum(count), 0) FROM {table} WHERE first_seq > ? AND last_seq <= ?"
            params = (low, high)
        async with db.execute(query, params) as cur:
            row = await cur.fetchone()
        count = int(row[0]) if row else 0
        # Plus the parts of the segments that straddle ``low`` (and ``high``).
        straddling: list[tuple[str, tuple[int, ...]]] = [
            (f"SELECT events FROM {table} WHERE first_seq <= ? AND last_seq > ?", (low, low))
        ]
        if high is not None:
            straddling.append(
                (
                    f"SELECT events FROM {table} WHERE first_seq > ? AND first_seq <= ? AND last_seq > ?",
                    (low, high, high),
                )
            )
        for query, params in straddling:
            async with db.execute(query, params) as cur:
                async for (blob,) in cur:
                    count += sum(1 for event in unpack_segment(blob) if state.holds(event.seq))
        return count

    # --- inspection -----------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._reader is not None or self._db is not None

    @property
    def last_sequence(self) -> int:
        return self._seq

    def depth(self, sink: str, lane: Lane) -> int:
        state = self._cursors.get((sink, lane))
        return state.depth if state else 0

    async def _refresh_size(self) -> None:
        db = self._reader
        if db is None:
            return
        try:
            async with db.execute("PRAGMA page_count") as cur:
                pages = (await cur.fetchone() or (0,))[0]
            async with db.execute("PRAGMA freelist_count") as cur:
                free = (await cur.fetchone() or (0,))[0]
            async with db.execute("PRAGMA page_size") as cur:
                page_size = (await cur.fetchone() or (4096,))[0]
        except (sqlite3.Error, ValueError) as exc:
            if is_corruption(exc):
                self._saw_corruption(exc)
                return
            raise
        self._size_bytes = (int(pages) - int(free)) * int(page_size)

    @property
    def size_bytes(self) -> int:
        """Bytes the buffer uses in its file, what ``max_size_mb`` bounds; refreshed by ``maintain``.

        Free pages are not counted, nor the delivery journal's share (bounded on its own, see
        ``journal_stats``): ``file_bytes`` is both.
        """
        return max(0, self._size_bytes - self._journal_bytes)

    @property
    def file_bytes(self) -> int:
        """Bytes in use in the database file, the journal's included (free pages not counted)."""
        return self._size_bytes

    async def maintain(self) -> None:
        """Periodic upkeep (about once a second): size cap and back-pressure."""
        if self._db is None:
            return
        if self._sequencing_known and (self._held or self._released):
            self._expire_held(time.time())
        self._written_since_size_check = 0
        await self._refresh_size()
        if self._reader is not None and self._healthy.is_set():
            try:
                await self._refresh_journal_info(self._reader)
            except sqlite3.Error as exc:
                if is_corruption(exc):
                    self._saw_corruption(exc)
        now = time.time()
        if self._journal_unindexed and now - self._journal_merge_checked >= _JOURNAL_MERGE_INTERVAL:
            # A quiet agent merges its few new ids now and then, so a lookup's tail scan stays short.
            self._journal_merge_checked = now
            self._journal_merge_due = True
            self._wake.set()
        # The journal's retention and size bound: trimmed by the commit loop, a bounded chunk at a time.
        oldest = self._journal_info["oldest_committed"]
        if self._journal_bytes > self.journal_max_bytes or (
            oldest is not None and oldest < time.time() - self.journal_retention
        ):
            self._journal_trim_due = True
            self._wake.set()
        # The journal has its own bound (``journal_max_bytes``, trimmed oldest first): its bytes never
        # make the buffer "full", or a month of delivered history would back-pressure the plant's sources.
        # The file may so grow to max_size_mb plus the journal's max_size_mb.
        size = self.size_bytes
        if size >= self.max_size_bytes:
            if self._telemetry_rows > 0:
                # Make room the only way allowed: telemetry goes first, counted and reported.
                self.telemetry_max_rows = max(0, min(self.telemetry_max_rows, self._telemetry_rows * 9 // 10))
                self._wake.set()
            elif self._refusing is None:
                self._refusing = f"buffer is full ({self.max_size_bytes // (1024 * 1024)} MB); sources back-pressured"
                self._writable.clear()
                log.error("Buffer full: transactions are back-pressured", extra={"size_bytes": size})
        elif size < 0.9 * self.max_size_bytes:
            # Room again (with hysteresis): the configured telemetry cap applies again.
            self.telemetry_max_rows = self._configured_telemetry_max_rows
        full = self._refusing is not None and self._refusing.startswith("buffer is full")
        if full and size < self.max_size_bytes:
            self._refusing = None
            self._writable.set()
            log.info("Buffer has room again; writes accepted", extra={"size_bytes": size})

    async def oldest_age(self, sink: str, lane: Lane) -> float | None:
        """Seconds since the oldest event ``sink`` has not acknowledged in ``lane`` was buffered."""
        state = self._cursors.get((sink, lane))
        db = self._reader
        if db is None or state is None or state.depth <= 0:
            return None
        query = f"SELECT enqueued FROM {_TABLE[lane]} WHERE last_seq > ? ORDER BY first_seq LIMIT 1"
        try:
            async with db.execute(query, (state.acked,)) as cur:
                row = await cur.fetchone()
        except (sqlite3.Error, ValueError) as exc:
            if is_corruption(exc):
                self._saw_corruption(exc)
                return None
            raise
        return max(0.0, time.time() - float(row[0])) if row else None

    async def stats(self, configured_sinks: Iterable[str] | Mapping[str, Iterable[Lane]] | None = None) -> BufferStats:
        """Depth and oldest age per sink and lane, dead letters, orphaned backlog, size.

        Orphaned: cursors of sinks not configured and of lanes their sink no longer
        takes (by ``configured_sinks`` when given, names or names -> lanes; else by
        ``configure_sinks``; else only cursors already frozen as orphaned).
        """
        configured: dict[str, frozenset[Lane] | None] | None
        if isinstance(configured_sinks, Mapping):
            configured = {name: frozenset(lanes) for name, lanes in configured_sinks.items()}
        elif configured_sinks is not None:
            configured = dict.fromkeys(configured_sinks, None)
        elif self._configured is not None:
            configured = dict(self._configured)
        else:
            configured = None
        sinks: dict[str, SinkStats] = {}
        orphaned: dict[str, int] = {}
        for (sink, lane), state in sorted(self._cursors.items()):
            if self._is_orphaned(sink, lane, state, configured):
                if state.depth:
                    orphaned[sink] = orphaned.get(sink, 0) + state.depth
                continue
            entry = sinks.setdefault(sink, SinkStats(depth=0, lanes={}))
            entry.lanes[lane] = LaneStats(depth=state.depth, oldest_age_seconds=await self.oldest_age(sink, lane))
            entry.depth += state.depth
        for name, lanes in (configured or {}).items():
            # A configured sink that has not had a cursor yet: there, empty.
            entry = sinks.setdefault(name, SinkStats(depth=0, lanes={}))
            for lane in lanes or ():
                entry.lanes.setdefault(lane, LaneStats(depth=0, oldest_age_seconds=None))
        await self._refresh_size()
        held = self.held_summary()
        return BufferStats(
            sinks=sinks,
            dead_letters=self.dead_letter_count,
            orphaned=orphaned,
            size_bytes=self.size_bytes,
            held=held if held.count else None,
        )

    async def dead_letters(self, sink: str | None = None) -> list[DeadLetter]:
        """Every dead letter (optionally of one sink), oldest first."""
        return [letter for _, letter in await self.dead_letter_rows(sink)]

    async def dead_letter_rows(self, sink: str | None = None) -> list[tuple[int, DeadLetter]]:
        """Every dead letter with its row number (what replay and purge name it by), oldest first."""
        db = self._reader
        if db is None:
            raise BufferError("buffer is not open")
        params: tuple[Any, ...] = ()
        where = ""
        if sink is not None:
            where = " WHERE sink = ?"
            params = (sink,)
        try:
            async with db.execute("PRAGMA table_info(dead_letters)") as cur:
                # A read-only look at a file from before the column existed: no context to show.
                context = "context" if "context" in {row[1] for row in await cur.fetchall()} else "NULL"
            query = f"SELECT n, id, sink, reason, type, subject, lane, time, body, {context} FROM dead_letters"
            async with db.execute(query + where + " ORDER BY n", params) as cur:
                rows = await cur.fetchall()
        except sqlite3.DatabaseError as exc:
            if is_corruption(exc):
                self._saw_corruption(exc)
                raise BufferError(f"buffer file is corrupt: {exc}") from exc
            raise
        return [
            (int(n), DeadLetter(id_, sink_, reason, type_, subject, lane, at, body, _context_of(context)))
            for n, id_, sink_, reason, type_, subject, lane, at, body, context in rows
        ]

    async def dead_letter_summary(self, top_reasons: int = 5) -> dict[str, DeadLetterGroup]:
        """Dead letters per sink: how many, the time of the oldest, and the most frequent reasons.

        One grouped scan of the dead-letter table; callers cache it (it changes only when
        dead letters are made, replayed or purged).
        """
        db = self._reader
        if db is None:
            raise BufferError("buffer is not open")
        query = "SELECT sink, reason, count(*), min(time) FROM dead_letters GROUP BY sink, reason"
        try:
            async with db.execute(query) as cur:
                rows = await cur.fetchall()
        except sqlite3.DatabaseError as exc:
            if is_corruption(exc):
                self._saw_corruption(exc)
                raise BufferError(f"buffer file is corrupt: {exc}") from exc
            raise
        grouped: dict[str, list[tuple[str, int, float]]] = {}
        for sink, reason, count, oldest in rows:
            grouped.setdefault(str(sink), []).append((str(reason), int(count), float(oldest)))
        summary: dict[str, DeadLetterGroup] = {}
        for sink, reasons in sorted(grouped.items()):
            reasons.sort(key=lambda entry: (-entry[1], entry[0]))
            top: dict[str, int] = {}
            for reason, count, _ in reasons[:top_reasons]:
                key = reason if len(reason) <= 200 else reason[:199] + "…"
                top[key] = top.get(key, 0) + count
            summary[sink] = DeadLetterGroup(
                count=sum(count for _, count, _ in reasons),
                oldest=min(oldest for _, _, oldest in reasons),
                reasons=top,
            )
        return summary

    # --- the delivery journal (``buffer.journal``) ---------------------------------------------------

    async def _journal_reader(self) -> aiosqlite.Connection | None:
        """The reader, when the file has the journal's tables (a read-only look at an old file may not)."""
        db = self._reader
        if db is None:
            raise BufferError("buffer is not open")
        if self._commit_task is None and not await journal_store.has_journal(db):
            return None
        return db

    async def trace(self, key: str, limit: int = 1000) -> list[JournalEntry]:
        """Every journal entry whose id, work order or lot is ``key``, oldest first, with its steps."""
        db = await self._journal_reader()
        if db is None:
            return []
        return await self._journal_read(journal_store.trace(db, key, limit))

    async def journal_entries(self, ids: Sequence[str]) -> dict[str, JournalEntry]:
        """The journal entries of ``ids`` that the journal knows, with their steps."""
        db = await self._journal_reader()
        if db is None:
            return {}
        return await self._journal_read(journal_store.entries_of(db, ids))

    async def journal_body(self, id: str) -> bytes | None:
        """The CloudEvent bytes the journal keeps for ``id`` (to replay it under its id), or None."""
        db = await self._journal_reader()
        if db is None:
            return None
        return await self._journal_read(journal_store.body_of(db, id))

    async def journal_window(
        self, start: float, end: float, type: str | None = None, *, by: str = "delivered"
    ) -> list[tuple[str, str, float | None, str | None]]:
        """``(id, type, delivered, outcome)`` of the entries whose ``by`` time is in ``[start, end)``, in order.

        ``by`` is ``delivered`` (the first acknowledgement) or ``committed``.
        """
        db = await self._journal_reader()
        if db is None:
            return []
        return await self._journal_read(journal_store.window(db, start, end, type, by=by))

    def record_outcomes(self, reports: Sequence[OutcomeReport]) -> asyncio.Future[None]:
        """What the ERP did with events: each entry's outcome columns and a step, in the next group commit.

        The future resolves when durable. The same report again changes nothing; a
        different later one overrides and is recorded as a new step. An id the journal
        does not know is ignored (``journal_entries`` tells the caller which those are).
        """
        if self._commit_task is None or self._closing:
            raise BufferError("buffer is not open")
        pending = self._pending
        if self.journal_enabled and reports:
            pending.journal.outcomes.extend(reports)
            pending.count += len(reports)
        return self._queued(pending)

    async def outcome_summary(self) -> dict[str, OutcomeCounts]:
        """Per full type: delivered but not yet confirmed, confirmed, rejected, oldest unconfirmed (in memory)."""
        if self._reader is not None:
            if not self._tally_loaded and await journal_store.has_journal(self._reader):
                await self._tally.load(self._reader)
            self._tally_loaded = True
            if self._tally.stale:
                await self._journal_read(self._tally.settle_oldest(self._reader))
        return {
            type_: OutcomeCounts(c.unconfirmed, c.confirmed, c.rejected, c.oldest_unconfirmed)
            for type_, c in sorted(self._tally.counts.items())
            if c.unconfirmed or c.confirmed or c.rejected
        }

    def journal_stats(self) -> dict[str, Any]:
        """The journal for ``/status``: entries, the oldest's commit time, estimated bytes, bounds, trimmed so far."""
        return {
            "enabled": self.journal_enabled,
            "entries": self._journal_info["entries"],
            "oldest_committed": self._journal_info["oldest_committed"],
            "bytes": self._journal_bytes,
            "max_bytes": self.journal_max_bytes,
            "retention_seconds": self.journal_retention,
            "trimmed": self._journal_trimmed,
        }

    async def _refresh_journal_info(self, db: aiosqlite.Connection) -> None:
        oldest = await journal_store.oldest_committed(db)
        self._journal_info = {
            "entries": self._journal_entries if oldest is not None else 0,
            "oldest_committed": oldest,
        }

    async def _journal_read(self, read: Awaitable[_T]) -> _T:
        try:
            return await read
        except sqlite3.DatabaseError as exc:
            if is_corruption(exc):
                self._saw_corruption(exc)
                raise BufferError(f"buffer file is corrupt: {exc}") from exc
            raise

    async def commit_now(self) -> None:
        """Wait until everything appended or acknowledged so far is committed."""
        future = self.append([])
        await future

    # --- operator actions: replay and purge (``buffer.admin`` wraps these) ------------------------

    def requeue(
        self, replayed: Sequence[tuple[int | None, dict[str, Any]]], failed: Sequence[tuple[int, str]] = ()
    ) -> asyncio.Future[None]:
        """Replay dead letters: each ``(row number, event)`` goes back into its lane, under its id.

        The event gets a fresh sequence and is delivered to every sink that takes its
        lane (one that had already acknowledged it gets it again, same id: the cloud
        dedupes). It bypasses the recent-ids dedupe, which would swallow it. Its dead
        letter row is removed in the same commit; each ``(row number, reason)`` in
        ``failed`` stays a dead letter with the new reason. A row number of None is
        not a dead letter: the event (from the journal) is resent to every sink of its
        lane under its id (reconciliation's resend). Each is a ``replayed`` journal step.
        """
        if self._commit_task is None or self._closing:
            raise BufferError("buffer is not open")
        pending = self._pending
        now = time.time()
        recent = self._recent_ids
        for n, event in replayed:
            lane = event_lane(event)
            guard = self._guard.get(event["type"])
            work_order: str | None = None
            if guard is not None or event["type"] in self._releasing:
                work_order = work_order_of(event.get("data"), event.get("subject"))
            if guard is not None and work_order is not None and not self._is_released(work_order, guard):
                # Back through the sequencing guard: held again, for a fresh ``hold``.
                event = {**event, "lane": lane}
                event.pop("sequence", None)
                held = _Held(event["id"], work_order, event["type"], lane, event.get("subject"), now, b"")
                held.body = msgspec.json.encode(event)
                self._held.setdefault(work_order, []).append(held)
                pending.held_add.append(held)
                if n is not None:
                    pending.dead_delete.append(n)
                if self.journal_enabled and lane != "telemetry":
                    detail = _replay_detail(n)
                    pending.journal.steps.append((held.id, now, "replayed", None, None, None, detail))
                    pending.journal.steps.append((held.id, now, "held", None, None, None, f"work order {work_order}"))
                continue
            self._seq += 1
            event = {**event, "lane": lane, "sequence": f"{self._seq:020d}"}
            body = msgspec.json.encode(event)
            pending.rows[lane].append(BufferedEvent(self._seq, lane, event["type"], event["id"], body, now))
            self._journal_sequenced(event, lane, self._seq, REPLAYED, now, "replayed", _replay_detail(n))
            if lane != "telemetry" and event["id"] not in recent:
                recent.remember([event["id"]], now)
                pending.dedupe.append(event["id"])
                pending.dedupe_time = now
            if n is not None:
                pending.dead_delete.append(n)
            if event["type"] in self._releasing and work_order is not None:
                self._release(work_order, event["type"], now)
        pending.dead_reason.extend((reason, now, n) for n, reason in failed)
        pending.count += len(replayed) + len(failed)
        return self._queued(pending)

    async def purge_sink(self, sink: str) -> dict[Lane, int]:
        """Drop ``sink``'s backlog (what it has not acknowledged), lane by lane; returns how many per lane.

        Its cursors are removed (a configured sink's jump to the head instead); the
        rows no other cursor holds are deleted in the same commit.
        """
        if self._commit_task is None:
            raise BufferError("buffer is not open")
        removed: dict[Lane, int] = {}
        for key in [key for key in self._cursors if key[0] == sink]:
            state = self._cursors[key]
            removed[key[1]] = state.depth
            if self._configured is not None and key[1] in self._configured.get(sink, ()):
                state.acked, state.frozen_at, state.depth = self._seq, None, 0
                self._dirty_cursors.add(key)
            else:
                del self._cursors[key]
                self._dirty_cursors.discard(key)
                self._pending.cursor_delete.append(key)
                self._pending.count += 1
                if not any(lane == key[1] for _, lane in self._cursors):
                    # Nobody else takes the lane: what the purged cursor held goes with it.
                    self._pending.lane_clear[key[1]] = self._seq
        if removed:
            await self._queued(self._pending)
        return removed

    async def purge_dead_letters(self, sink: str | None = None) -> int:
        """Delete the dead letters (of one sink, or all); returns how many."""
        if self._commit_task is None:
            raise BufferError("buffer is not open")
        rows = [n for n, _ in await self.dead_letter_rows(sink)]
        self._pending.dead_delete.extend(rows)
        self._pending.count += len(rows)
        await self._queued(self._pending)
        return len(rows)


def event_lane(event: Mapping[str, Any]) -> Lane:
    """The lane of a decoded CloudEvent, from its type (ValueError for a type not in the canonical list)."""
    type_ = event.get("type")
    name = type_.removeprefix(TYPE_PREFIX) if isinstance(type_, str) and type_.startswith(TYPE_PREFIX) else None
    if name not in LANE_OF_TYPE:
        raise ValueError(f"type {type_!r} is not a canonical event type")
    if not isinstance(event.get("id"), str) or not event["id"]:
        raise ValueError("the event has no id")
    return LANE_OF_TYPE[name]


def _owner_only(path: Path) -> None:
    """Create the database file 0600 before SQLite does (it would make it 0644), or tighten an older one.

    SQLite creates ``-wal`` and ``-shm`` with the mode of the database file, so they follow.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        with contextlib.suppress(PermissionError):  # not ours to change (another owner)
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                path.chmod(mode & 0o700)
        return
    os.close(fd)


def lock_holder(path: Path) -> str | None:
    """The process holding ``path``'s buffer lock (a running agent), or None when nobody does."""
    lock = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)  # releases the probe's shared lock too
    return None


async def inspect_stats(
    path: Path, configured_sinks: Iterable[str] | Mapping[str, Iterable[Lane]] | None = None
) -> BufferStats:
    """``plantgate buffer stats`` on a buffer file, read-only (the agent may be running)."""
    buffer = Buffer(path)
    await buffer.open(readonly=True)
    try:
        return await buffer.stats(configured_sinks)
    finally:
        await buffer.close()


async def inspect_dead_letters(path: Path, sink: str | None = None) -> list[DeadLetter]:
    """``plantgate buffer dead-letters`` on a buffer file, read-only."""
    buffer = Buffer(path)
    await buffer.open(readonly=True)
    try:
        return await buffer.dead_letters(sink)
    finally:
        await buffer.close()


class RecentIds:
    """The ids of the transaction and operational events accepted within the dedupe window.

    ``window`` seconds back from now, at most ``capacity`` of them (the oldest are
    forgotten first): an id in here is a fact already stored, and the same id again is
    not stored twice. Held as the ids themselves, not hashes of them: a hash collision
    would silently drop a genuine transaction, and a set of strings costs the append
    path nothing (a string caches its hash). ``groups`` are ``[accepted time, count]``
    runs of ``order``, so forgetting by time costs one comparison per group. The buffer
    persists each group commit's new ids as one row of its ``dedupe`` table.
    """

    def __init__(self, capacity: int, window: float = DEDUPE_WINDOW):
        self.capacity = capacity
        self.window = window
        self.ids: set[str] = set()
        self.order: collections.deque[str] = collections.deque()
        """Acceptance order; ``Buffer.append`` adds to ``ids``, ``order`` and ``groups``, then calls ``trim``."""
        self.groups: collections.deque[list[float]] = collections.deque()

    def __contains__(self, event_id: object) -> bool:
        return event_id in self.ids

    def __len__(self) -> int:
        return len(self.order)

    def remember(self, ids: Iterable[str], accepted: float) -> None:
        """Remember ``ids`` as accepted at ``accepted`` (Unix time); one already remembered is skipped."""
        added = 0
        for event_id in ids:
            if event_id not in self.ids:
                self.ids.add(event_id)
                self.order.append(event_id)
                added += 1
        if added:
            self.groups.append([accepted, added])

    def trim(self, now: float) -> None:
        """Forget the ids accepted before the window, and the oldest beyond ``capacity``."""
        order, ids, groups = self.order, self.ids, self.groups
        limit = now - self.window
        while groups and groups[0][0] < limit:
            for _ in range(int(groups.popleft()[1])):
                ids.discard(order.popleft())
        excess = len(order) - self.capacity
        while excess > 0 and groups:
            first = groups[0]
            take = min(excess, int(first[1]))
            for _ in range(take):
                ids.discard(order.popleft())
            excess -= take
            first[1] -= take
            if not first[1]:
                groups.popleft()

    def oldest(self, now: float) -> float:
        """When the oldest id still remembered was accepted (``now`` when none is)."""
        return self.groups[0][0] if self.groups else now


def _evictions_of(events: Sequence[BufferedEvent]) -> list[Eviction]:
    """Group evicted telemetry events by source: tags, counts, source-time range."""
    by_source: dict[str, Eviction] = {}
    for buffered in events:
        event = decode_event(buffered.body)
        data = event.get("data") or {}
        samples = data.get("samples") or data.get("aggregates") or []
        times = [_parse_time(t) for t in (s.get("time") or s.get("end") for s in samples) if t]
        if not times:
            times = [_parse_time(event["time"])]
        source = str(event.get("source", "?")).rsplit("/", 1)[-1]
        entry = by_source.get(source)
        if entry is None:
            entry = by_source[source] = Eviction(
                source=source, tags=[], events=0, samples=0, start=min(times), end=max(times)
            )
        entry.events += 1
        entry.samples += len(samples)
        entry.start = min(entry.start, *times)
        entry.end = max(entry.end, *times)
        for sample in samples:
            tag = sample.get("tag")
            if tag and tag not in entry.tags:
                entry.tags.append(tag)
    return list(by_source.values())


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
