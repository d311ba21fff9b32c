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
cursor that takes its lane (configured or orphaned) has passed its last event,
so a removed or renamed sink never loses its backlog.

Writes go through one commit loop: whatever was appended while the previous
transaction committed goes into the next one (group commit, no added wait), in
transactions of at most ``max_rows_per_commit`` rows so the WAL stays bounded.
Nothing else in the project touches SQLite.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sqlite3
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
import msgspec

from agent.events import LANES, CloudEvent, Lane, decode_event, encode_event
from agent.sink import ACKED, BufferedEvent, Outcome, Rejected

log = logging.getLogger(__name__)

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
    sink TEXT NOT NULL, lane TEXT NOT NULL, acked INTEGER NOT NULL, PRIMARY KEY (sink, lane)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    n INTEGER PRIMARY KEY, id TEXT NOT NULL, sink TEXT NOT NULL, reason TEXT NOT NULL, type TEXT NOT NULL,
    subject TEXT, lane TEXT NOT NULL, time REAL NOT NULL, body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
"""

_SEGMENT_MAX_EVENTS = 1024
_segment_encoder = msgspec.msgpack.Encoder()
_segment_decoder = msgspec.msgpack.Decoder(list[BufferedEvent])
_ZLIB_HEADER = 0x78  # a zlib stream's first byte; a MessagePack array never starts with it


def pack_segment(events: Sequence[BufferedEvent]) -> bytes:
    """One segment's stored form: MessagePack of the events, zlib level 1.

    Events of one lane and source repeat their keys and most values, so this is
    10-20 times smaller: the disk (WAL, then checkpoint) writes that much less, and
    zlib releases the GIL while it works, so SQLite's thread keeps going meanwhile.
    """
    return zlib.compress(_segment_encoder.encode(events), 1)


def unpack_segment(blob: bytes) -> list[BufferedEvent]:
    """The events of a stored segment (compressed or, as first written, plain)."""
    if blob and blob[0] == _ZLIB_HEADER:
        blob = zlib.decompress(blob)
    return _segment_decoder.decode(blob)


class BufferError(Exception):
    """The buffer cannot do what was asked (cannot open, corrupt, closed)."""


class DeadLetter(msgspec.Struct, frozen=True):
    """An event held with the reason it could not go on; listed and replayed by operators."""

    id: str
    sink: str
    reason: str
    type: str
    subject: str | None
    lane: Lane
    time: float
    body: bytes


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


class BufferStats(msgspec.Struct):
    """What ``plantgate buffer stats`` and ``/status`` show (the ``--json`` shape is contract)."""

    sinks: dict[str, SinkStats]
    dead_letters: int
    orphaned: dict[str, int]
    size_bytes: int


@dataclass
class _LaneCursor:
    acked: int  # everything <= acked is delivered or dead-lettered for this sink
    depth: int = 0  # rows in the lane with seq > acked


@dataclass
class _Pending:
    rows: dict[Lane, list[BufferedEvent]] = field(default_factory=lambda: {lane: [] for lane in LANES})
    dead: list[DeadLetter] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    count: int = 0


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
            if self.depth() > 0:
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
        for event, outcome in zip(batch, outcomes, strict=True):
            lane = event.lane
            if lane in blocked:
                continue
            if outcome is ACKED:
                advance[lane] = event.seq
                settlement.acked.append(event)
            elif isinstance(outcome, Rejected):
                advance[lane] = event.seq
                settlement.rejected.append((event, outcome.reason))
            else:
                blocked.add(lane)
                settlement.retry += 1
        dead = [_dead_letter_of(event, self.sink, reason) for event, reason in settlement.rejected]
        self._buffer._advance(self.sink, self._lanes, advance, batch, dead)
        return settlement


@dataclass
class Settlement:
    """What one ``settle`` did: for metrics and logs."""

    acked: list[BufferedEvent] = field(default_factory=list)
    rejected: list[tuple[BufferedEvent, str]] = field(default_factory=list)
    retry: int = 0


def _dead_letter_of(event: BufferedEvent, sink: str, reason: str) -> DeadLetter:
    subject = decode_event(event.body).get("subject")
    return DeadLetter(
        id=event.id, sink=sink, reason=reason, type=event.type, subject=subject,
        lane=event.lane, time=time.time(), body=event.body,
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
        recent_ids: int = 20_000,
    ):
        self.path = path
        self.telemetry_max_rows = telemetry_max_rows
        self._configured_telemetry_max_rows = telemetry_max_rows
        self.max_size_bytes = int(max_size_mb * 1024 * 1024)
        self.synchronous = synchronous.upper()
        self.max_rows_per_commit = max_rows_per_commit
        self.max_pending_rows = max_pending_rows
        self._db: aiosqlite.Connection | None = None
        self._seq = 0
        self._pending = _Pending()
        self._wake = asyncio.Event()  # something to commit
        self._writable = asyncio.Event()  # not back-pressuring appends
        self._writable.set()
        self._refusing: str | None = None  # why writes are refused (disk full, size cap), None when fine
        self._cursors: dict[tuple[str, Lane], _LaneCursor] = {}
        self._dirty_cursors: set[tuple[str, Lane]] = set()
        self._new_data: dict[str, asyncio.Event] = {}
        self._telemetry_rows = 0
        self._decoded: dict[tuple[Lane, int], list[BufferedEvent]] = {}
        self._size_bytes = 0
        self._commit_task: asyncio.Task[None] | None = None
        self._closing = False
        self._commit_error: BaseException | None = None
        self.evictions: list[Eviction] = []
        """Telemetry evictions not yet reported; the agent drains it into gap events."""
        self.on_eviction: asyncio.Event = asyncio.Event()
        self.duplicates_suppressed = 0
        self.dead_letter_count = 0
        self._recent_ids = RecentIds(recent_ids)
        self.quarantined: dict[str, Any] | None = None
        """Set when ``open`` found a corrupt file and moved it aside: path, moved_to, reason, size_bytes."""

    # --- lifecycle ------------------------------------------------------------------------------

    async def open(self, *, readonly: bool = False) -> None:
        """Open (creating if needed), check integrity, quarantine a corrupt file, load cursors.

        ``readonly`` is for inspecting a buffer, also one a running agent is writing
        (WAL lets a reader in): no integrity repair, no commit loop, no writes.
        """
        if readonly:
            if not self.path.exists():
                raise FileNotFoundError(self.path)
            self._db = await aiosqlite.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            reason = await self._check_integrity()
            if reason is not None:
                self.quarantined = self._quarantine(reason)
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
        db = self._db
        if not readonly:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute(f"PRAGMA synchronous={self.synchronous}")
            # Keep the WAL from growing without bound after a burst: truncate it back after checkpoints.
            await db.execute("PRAGMA journal_size_limit=67108864")
            await db.execute("PRAGMA wal_autocheckpoint=2000")
            # Segments are read once, right after they are written: a small page cache is enough.
            await db.execute("PRAGMA cache_size=-4000")
            await db.execute("PRAGMA temp_store=MEMORY")
            await db.executescript(_SCHEMA)
        seq = 0
        async with db.execute("SELECT value FROM meta WHERE key='last_seq'") as cur:
            row = await cur.fetchone()
            if row:
                seq = int(row[0])
        for lane in LANES:
            async with db.execute(f"SELECT max(last_seq) FROM {_TABLE[lane]}") as cur:
                row = await cur.fetchone()
                if row and row[0] is not None:
                    seq = max(seq, int(row[0]))
        self._seq = seq
        # The newest ids only: enough to recognise a fact replayed after a reconnect or restart.
        recent: list[tuple[int, str]] = []
        for lane in ("transaction", "operational"):
            async with db.execute(f"SELECT events FROM {_TABLE[lane]} ORDER BY first_seq DESC") as cur:
                taken = 0
                async for (blob,) in cur:
                    events = unpack_segment(blob)
                    recent.extend((event.seq, event.id) for event in events)
                    taken += len(events)
                    if taken >= self._recent_ids.capacity:
                        break
        recent.sort()
        self._recent_ids.extend(event_id for _, event_id in recent[-self._recent_ids.capacity :])
        async with db.execute("SELECT coalesce(sum(count), 0) FROM lane_telemetry") as cur:
            row = await cur.fetchone()
            self._telemetry_rows = int(row[0]) if row else 0
        async with db.execute("SELECT sink, lane, acked FROM cursors") as cur:
            for sink, lane, acked in await cur.fetchall():
                if lane in _TABLE:
                    self._cursors[(sink, lane)] = _LaneCursor(acked=int(acked))
        for (_, lane), state in self._cursors.items():
            state.depth = await self._count_after(lane, state.acked)
        async with db.execute("SELECT count(*) FROM dead_letters") as cur:
            row = await cur.fetchone()
            self.dead_letter_count = int(row[0]) if row else 0
        await self._refresh_size()
        if not readonly:
            self._commit_task = asyncio.create_task(self._commit_loop(), name="buffer-commit")

    async def close(self) -> None:
        """Commit what is pending, persist cursors, close the file."""
        if self._db is None:
            return
        if self._commit_task is None:  # read-only
            await self._db.close()
            self._db = None
            return
        self._closing = True
        self._wake.set()
        if self._commit_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._commit_task
        for event in self._new_data.values():
            event.set()
        await self._db.close()
        self._db = None

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
        size = self.path.stat().st_size
        self.path.rename(moved_to)
        for suffix in ("-wal", "-shm"):
            extra = self.path.with_name(self.path.name + suffix)
            if extra.exists():
                extra.rename(moved_to.with_name(f"{self.path.name}{suffix}.corrupt-{stamp}"))
        log.error(
            "Buffer file is corrupt; moved aside and starting on a fresh file",
            extra={"path": str(self.path), "moved_to": str(moved_to), "reason": reason},
        )
        return {"path": str(self.path), "moved_to": str(moved_to), "reason": reason, "size_bytes": size}

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

    def append(self, events: Sequence[CloudEvent], dead_letters: Sequence[DeadLetter] = ()) -> asyncio.Future[None]:
        """Queue events (and dead letters made before any sink) for the next commit.

        Assigns each event its ``sequence`` and encodes it, once. The returned future
        completes when the commit holding them is durable: acknowledge a source (202,
        PLC handshake) only after awaiting it.
        """
        if self._db is None or self._closing:
            raise BufferError("buffer is not open")
        pending = self._pending
        now = time.time()
        seq = self._seq
        rows = pending.rows
        recent = self._recent_ids
        seen, fresh = recent.ids, recent.order
        encode = encode_event
        for event in events:
            lane = event.lane
            event_id = event.id
            if lane != "telemetry":
                if event_id in seen:
                    # The same fact again (a source replayed it after a reconnect): same id, stored once.
                    self.duplicates_suppressed += 1
                    continue
                seen.add(event_id)
                fresh.append(event_id)
            seq += 1
            event.sequence = f"{seq:020d}"  # format_sequence, inlined on the hot path
            rows[lane].append(BufferedEvent(seq, lane, event.type, event_id, encode(event), now))
        recent.trim()
        self._seq = seq
        pending.dead.extend(dead_letters)
        pending.count += len(events) + len(dead_letters)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pending.waiters.append(future)
        if pending.count >= self.max_pending_rows:
            self._writable.clear()
        self._wake.set()
        return future

    async def _commit_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
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
            if self._closing and not self._pending.count and not self._dirty_cursors:
                return

    async def _commit_failed(self, pending: _Pending, exc: sqlite3.Error) -> None:
        """Keep the rows and retry: a full disk clears up, a transaction must not be lost."""
        self._refusing = f"commit failed: {exc}"
        self._writable.clear()
        log.error("Buffer commit failed; writes refused until it succeeds", extra={"error": str(exc)})
        # Put the failed rows back in front of anything appended since, in order.
        newer, self._pending = self._pending, pending
        for lane in LANES:
            pending.rows[lane].extend(newer.rows[lane])
        pending.dead.extend(newer.dead)
        pending.waiters.extend(newer.waiters)
        pending.count += newer.count
        if self._closing:
            self._commit_error = exc
            for future in pending.waiters:
                if not future.done():
                    future.set_exception(BufferError(f"buffer commit failed: {exc}"))
            raise BufferError(f"buffer commit failed while closing: {exc}") from exc
        await asyncio.sleep(1.0)
        self._wake.set()

    async def _commit(self, pending: _Pending) -> None:
        db = self._db
        assert db is not None
        # Split a large backlog of rows into bounded transactions (WAL size), in order.
        chunks: list[dict[Lane, list[BufferedEvent]]] = []
        current: dict[Lane, list[BufferedEvent]] = {}
        size = 0
        for lane in LANES:
            rows = pending.rows[lane]
            start = 0
            while start < len(rows):
                take = min(len(rows) - start, self.max_rows_per_commit - size)
                current.setdefault(lane, []).extend(rows[start : start + take])
                start += take
                size += take
                if size >= self.max_rows_per_commit:
                    chunks.append(current)
                    current, size = {}, 0
        chunks.append(current)
        for index, chunk in enumerate(chunks):
            last = index == len(chunks) - 1
            await db.execute("BEGIN IMMEDIATE")
            try:
                # Counted before eviction so the cap holds right after the commit that crosses it;
                # a failed commit recounts from the file.
                self._count_inserted(await self._insert(db, chunk))
                if last:
                    if pending.dead:
                        await self._insert_dead(db, pending.dead)
                    await self._write_cursors(db)
                    await self._delete_delivered(db)
                    await self._evict_telemetry(db)
                await db.execute(
                    "INSERT INTO meta(key, value) VALUES ('last_seq', ?) "
                    "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                    (self._seq,),
                )
                await db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await db.execute("ROLLBACK")
                # The retry writes the rows again; the cursor positions this commit carried too.
                self._dirty_cursors.update(self._cursors)
                await self._recount()
                raise
        self.dead_letter_count += len(pending.dead)
        if self._refusing is not None and self._refusing.startswith("commit failed"):
            log.info("Buffer commits succeed again; writes accepted")
            self._refusing = None

    async def _insert(
        self, db: aiosqlite.Connection, chunk: dict[Lane, list[BufferedEvent]]
    ) -> dict[Lane, list[BufferedEvent]]:
        inserted: dict[Lane, list[BufferedEvent]] = {}
        now = time.time()
        for lane, events in chunk.items():
            if not events:
                continue
            segments = [
                events[start : start + _SEGMENT_MAX_EVENTS] for start in range(0, len(events), _SEGMENT_MAX_EVENTS)
            ]
            await db.executemany(
                f"INSERT INTO {_TABLE[lane]}(first_seq, last_seq, count, enqueued, events) VALUES (?,?,?,?,?)",
                [(seg[0].seq, seg[-1].seq, len(seg), now, pack_segment(seg)) for seg in segments],
            )
            inserted[lane] = events
        return inserted

    def _count_inserted(self, inserted: dict[Lane, list[BufferedEvent]]) -> None:
        for lane, events in inserted.items():
            if lane == "telemetry":
                self._telemetry_rows += len(events)
            for (_, cursor_lane), state in self._cursors.items():
                if cursor_lane == lane:
                    # A cursor made after these were sequenced (a new sink) starts past them.
                    if state.acked < events[0].seq:
                        state.depth += len(events)
                    else:
                        state.depth += sum(1 for event in events if event.seq > state.acked)

    async def _insert_dead(self, db: aiosqlite.Connection, dead: list[DeadLetter]) -> None:
        await db.executemany(
            "INSERT INTO dead_letters(id, sink, reason, type, subject, lane, time, body) VALUES (?,?,?,?,?,?,?,?)",
            [(d.id, d.sink, d.reason, d.type, d.subject, d.lane, d.time, d.body) for d in dead],
        )

    async def _write_cursors(self, db: aiosqlite.Connection) -> None:
        if not self._dirty_cursors:
            return
        rows = [(sink, lane, self._cursors[(sink, lane)].acked) for sink, lane in self._dirty_cursors]
        self._dirty_cursors.clear()
        await db.executemany(
            "INSERT INTO cursors(sink, lane, acked) VALUES (?,?,?) "
            "ON CONFLICT(sink, lane) DO UPDATE SET acked=excluded.acked",
            rows,
        )

    async def _delete_delivered(self, db: aiosqlite.Connection) -> None:
        for lane in LANES:
            marks = [state.acked for (_, cursor_lane), state in self._cursors.items() if cursor_lane == lane]
            if not marks:
                continue
            mark = min(marks)
            if lane == "telemetry":
                async with db.execute(
                    "SELECT coalesce(sum(count), 0) FROM lane_telemetry WHERE first_seq <= ? AND last_seq <= ?",
                    (mark, mark),
                ) as cur:
                    row = await cur.fetchone()
                self._telemetry_rows -= int(row[0]) if row else 0
            await db.execute(f"DELETE FROM {_TABLE[lane]} WHERE first_seq <= ? AND last_seq <= ?", (mark, mark))

    async def _evict_telemetry(self, db: aiosqlite.Connection) -> None:
        """Oldest telemetry first, only when over the row cap; counted and reported."""
        excess = self._telemetry_rows - self.telemetry_max_rows
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
        self._telemetry_rows -= len(evicted)
        for (_, lane), state in self._cursors.items():
            if lane == "telemetry":
                state.depth = max(0, state.depth - sum(1 for event in evicted if event.seq > state.acked))
        self.evictions.extend(_evictions_of(evicted))
        self.on_eviction.set()

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
        db = self._db
        if db is None:
            return []
        batch: list[BufferedEvent] = []
        for lane, state in lanes.items():
            if state.depth <= 0:
                continue
            table = _TABLE[lane]
            # The segment holding acked+1 may start before it: begin at the last segment starting <= acked.
            async with db.execute(
                f"SELECT coalesce(max(first_seq), 0) FROM {table} WHERE first_seq <= ?", (state.acked,)
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
                    events = self._segment(lane, first_seq, blob)
                    batch.extend(event for event in events if event.seq > state.acked)
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
        """Depths and the telemetry row count from the file (after a rolled-back commit)."""
        assert self._db is not None
        with contextlib.suppress(sqlite3.Error):
            async with self._db.execute("SELECT coalesce(sum(count), 0) FROM lane_telemetry") as cur:
                row = await cur.fetchone()
            self._telemetry_rows = int(row[0]) if row else 0
            for (_, lane), state in self._cursors.items():
                state.depth = await self._count_after(lane, state.acked)

    async def _count_after(self, lane: Lane, seq: int) -> int:
        assert self._db is not None
        async with self._db.execute(
            f"SELECT coalesce(sum(count), 0) FROM {_TABLE[lane]} WHERE first_seq > ?", (seq,)
        ) as cur:
            row = await cur.fetchone()
        count = int(row[0]) if row else 0
        # Plus the part of the segment that straddles ``seq``.
        async with self._db.execute(
            f"SELECT events FROM {_TABLE[lane]} WHERE first_seq <= ? AND last_seq > ? ", (seq, seq)
        ) as cur:
            async for (blob,) in cur:
                count += sum(1 for event in unpack_segment(blob) if event.seq > seq)
        return count

    # --- inspection -----------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._db is not None

    @property
    def last_sequence(self) -> int:
        return self._seq

    def depth(self, sink: str, lane: Lane) -> int:
        state = self._cursors.get((sink, lane))
        return state.depth if state else 0

    async def _refresh_size(self) -> None:
        assert self._db is not None
        async with self._db.execute("PRAGMA page_count") as cur:
            pages = (await cur.fetchone() or (0,))[0]
        async with self._db.execute("PRAGMA freelist_count") as cur:
            free = (await cur.fetchone() or (0,))[0]
        async with self._db.execute("PRAGMA page_size") as cur:
            page_size = (await cur.fetchone() or (4096,))[0]
        self._size_bytes = (int(pages) - int(free)) * int(page_size)

    @property
    def size_bytes(self) -> int:
        """Bytes in use in the database file (free pages not counted); refreshed by ``maintain``."""
        return self._size_bytes

    async def maintain(self) -> None:
        """Periodic upkeep (about once a second): size cap and back-pressure."""
        if self._db is None:
            return
        await self._refresh_size()
        if self._size_bytes >= self.max_size_bytes:
            if self._telemetry_rows > 0:
                # Make room the only way allowed: telemetry goes first, counted and reported.
                self.telemetry_max_rows = max(0, min(self.telemetry_max_rows, self._telemetry_rows * 9 // 10))
                self._wake.set()
            elif self._refusing is None:
                self._refusing = f"buffer is full ({self.max_size_bytes // (1024 * 1024)} MB); sources back-pressured"
                self._writable.clear()
                log.error("Buffer full: transactions are back-pressured", extra={"size_bytes": self._size_bytes})
        elif self._size_bytes < 0.9 * self.max_size_bytes:
            # Room again (with hysteresis): the configured telemetry cap applies again.
            self.telemetry_max_rows = self._configured_telemetry_max_rows
        full = self._refusing is not None and self._refusing.startswith("buffer is full")
        if full and self._size_bytes < self.max_size_bytes:
            self._refusing = None
            self._writable.set()
            log.info("Buffer has room again; writes accepted", extra={"size_bytes": self._size_bytes})

    async def oldest_age(self, sink: str, lane: Lane) -> float | None:
        """Seconds since the oldest event ``sink`` has not acknowledged in ``lane`` was buffered."""
        state = self._cursors.get((sink, lane))
        if self._db is None or state is None or state.depth <= 0:
            return None
        async with self._db.execute(
            f"SELECT enqueued FROM {_TABLE[lane]} WHERE last_seq > ? ORDER BY first_seq LIMIT 1", (state.acked,)
        ) as cur:
            row = await cur.fetchone()
        return max(0.0, time.time() - float(row[0])) if row else None

    async def stats(self, configured_sinks: Iterable[str] | None = None) -> BufferStats:
        """Depth and oldest age per sink and lane, dead letters, orphaned backlog, size."""
        assert self._db is not None
        configured = set(configured_sinks) if configured_sinks is not None else None
        sinks: dict[str, SinkStats] = {}
        orphaned: dict[str, int] = {}
        for (sink, lane), state in sorted(self._cursors.items()):
            if configured is not None and sink not in configured:
                if state.depth:
                    orphaned[sink] = orphaned.get(sink, 0) + state.depth
                continue
            entry = sinks.setdefault(sink, SinkStats(depth=0, lanes={}))
            entry.lanes[lane] = LaneStats(depth=state.depth, oldest_age_seconds=await self.oldest_age(sink, lane))
            entry.depth += state.depth
        async with self._db.execute("SELECT count(*) FROM dead_letters") as cur:
            row = await cur.fetchone()
        await self._refresh_size()
        return BufferStats(
            sinks=sinks, dead_letters=int(row[0]) if row else 0, orphaned=orphaned, size_bytes=self._size_bytes
        )

    async def dead_letters(self, sink: str | None = None) -> list[DeadLetter]:
        """Every dead letter (optionally of one sink), oldest first."""
        assert self._db is not None
        query = "SELECT id, sink, reason, type, subject, lane, time, body FROM dead_letters"
        params: tuple[Any, ...] = ()
        if sink is not None:
            query += " WHERE sink = ?"
            params = (sink,)
        async with self._db.execute(query + " ORDER BY n", params) as cur:
            rows = await cur.fetchall()
        return [DeadLetter(*row) for row in rows]

    async def commit_now(self) -> None:
        """Wait until everything appended or acknowledged so far is committed."""
        future = self.append([])
        await future


async def inspect_stats(path: Path, configured_sinks: Iterable[str]) -> BufferStats:
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
    """The ids of the last ``capacity`` transaction and operational events, for dedupe at append.

    A unique index on random ids would cost SQLite two thirds of its insert rate;
    a bounded in-memory set, refilled from the buffered rows at start, keeps the
    same fact from being stored twice while it is buffered or recent.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.ids: set[str] = set()
        self.order: collections.deque[str] = collections.deque()
        """Insertion order; ``append`` adds to both and calls ``trim`` once per group."""

    def __contains__(self, event_id: object) -> bool:
        return event_id in self.ids

    def extend(self, ids: Iterable[str]) -> None:
        for event_id in ids:
            self.ids.add(event_id)
            self.order.append(event_id)
        self.trim()

    def trim(self) -> None:
        """Forget the oldest ids beyond ``capacity``."""
        order, ids = self.order, self.ids
        for _ in range(len(order) - self.capacity):
            ids.discard(order.popleft())


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
