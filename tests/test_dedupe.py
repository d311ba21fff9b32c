"""Duplicate suppression at the edge: one fact, one event, within a window that survives restarts.

The buffer remembers the id of every transaction and operational event it
accepted for ``dedupe_window`` (at most ``dedupe_max_ids`` of them) in its own
file, so the same id arriving again is not stored twice: after its original was
delivered and deleted, after a restart, and after the file was moved aside as
corrupt. Real SQLite files in ``tmp_path``; ``sqlite3`` only to look at the table
or to make a file as an older version wrote it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from agent.events import CloudEvent, Lane
from buffer import Buffer
from buffer.store import RecentIds
from tests.buffered import take_all
from tests.test_buffer import event
from tests.test_buffer_faults import _damaged_buffer

ALL: list[Lane] = ["transaction", "operational", "telemetry"]


@contextlib.asynccontextmanager
async def opened(path: Path, **options: float | int | None) -> AsyncIterator[Buffer]:
    """The buffer with its sink's cursor made at once, as the agent does at start; closed whatever happens."""
    buffer = Buffer(path, synchronous="NORMAL", sinks={"cloud": ALL}, **options)  # type: ignore[arg-type]
    await buffer.open()
    try:
        buffer.cursor("cloud", ALL)
        yield buffer
    finally:
        await buffer.close()


async def store(buffer: Buffer, events: list[CloudEvent]) -> None:
    await buffer.append(events)


def rows_in(path: Path, table: str) -> int:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        (count,) = db.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(count)


async def test_a_duplicate_after_delivery_and_restart_is_suppressed(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    async with opened(path) as buffer:
        await store(buffer, [event("transaction", id="tx-1"), event("operational", id="op-1")])
        assert [e.id for e in await take_all(buffer, buffer.cursor("cloud", ALL))] == ["tx-1", "op-1"]
    assert rows_in(path, "lane_transaction") == 0  # delivered and deleted: only the dedupe table remembers
    async with opened(path) as buffer:
        again = [event("transaction", id="tx-1"), event("operational", id="op-1"), event("transaction", id="tx-2")]
        await store(buffer, again)
        assert buffer.duplicates_suppressed == 2
        assert [e.id for e in await take_all(buffer, buffer.cursor("cloud", ALL))] == ["tx-2"]
        status = buffer.dedupe_status()
        assert status["ids"] == 3
        assert status["window_seconds"] == 86_400.0


async def test_telemetry_ids_are_not_remembered(tmp_path: Path) -> None:
    async with opened(tmp_path / "buffer.db") as buffer:
        await store(buffer, [event("telemetry", id="t-1"), event("telemetry", id="t-1")])
        assert buffer.duplicates_suppressed == 0
        assert buffer.dedupe_status()["ids"] == 0


async def test_an_id_older_than_the_window_is_accepted_again(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    async with opened(path, dedupe_window=3600.0) as buffer:
        await store(buffer, [event(id="tx-old")])
        await take_all(buffer, buffer.cursor("cloud", ALL))
    # The same file under a window that the time since has already passed.
    async with opened(path, dedupe_window=1e-6) as buffer:
        await store(buffer, [event(id="tx-old")])
        assert buffer.duplicates_suppressed == 0
        assert [e.id for e in await take_all(buffer, buffer.cursor("cloud", ALL))] == ["tx-old"]


async def test_the_bound_forgets_the_oldest_first_and_bounds_the_table(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    async with opened(path, dedupe_max_ids=3) as buffer:
        for index in range(40):
            await store(buffer, [event(id=f"tx-{index}")])
        assert buffer.dedupe_status()["ids"] == 3
        await take_all(buffer, buffer.cursor("cloud", ALL))
    async with opened(path, dedupe_max_ids=3) as buffer:
        await store(buffer, [event(id="tx-39"), event(id="tx-37"), event(id="tx-36")])
        assert buffer.duplicates_suppressed == 2  # 37 and 39 remembered, 36 forgotten
        await buffer.commit_now()
        # The first commit after start deletes every row older than what is remembered.
        assert rows_in(path, "dedupe") <= 3


async def test_plantgate_buffer_opening_the_file_keeps_the_agents_window(tmp_path: Path) -> None:
    """An operator's ``plantgate buffer`` opens the file without the agent's settings: it uses the file's."""
    path = tmp_path / "buffer.db"
    async with opened(path, dedupe_window=7 * 86_400.0, dedupe_max_ids=500_000) as buffer:
        await store(buffer, [event(id="tx-1")])
    async with opened(path) as buffer:
        status = buffer.dedupe_status()
        assert (status["window_seconds"], status["max_ids"], status["ids"]) == (7 * 86_400.0, 500_000, 1)


async def test_a_file_of_an_older_version_remembers_what_it_still_buffers(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    async with opened(path) as buffer:
        await store(buffer, [event(id="tx-1"), event(id="tx-2")])
    with sqlite3.connect(path) as db:  # as a version before the dedupe table left the file
        db.execute("DROP TABLE dedupe")
    async with opened(path) as buffer:
        await store(buffer, [event(id="tx-1")])
        assert buffer.duplicates_suppressed == 1
        await take_all(buffer, buffer.cursor("cloud", ALL))
    assert rows_in(path, "lane_transaction") == 0
    async with opened(path) as buffer:
        await store(buffer, [event(id="tx-2"), event(id="tx-1")])
        assert buffer.duplicates_suppressed == 2


async def test_a_duplicate_within_one_group_is_stored_once(tmp_path: Path) -> None:
    async with opened(tmp_path / "buffer.db") as buffer:
        await store(buffer, [event(id="scan-1"), event(id="scan-1"), event("operational", id="scan-1")])
        assert buffer.duplicates_suppressed == 2
        assert [e.id for e in await take_all(buffer, buffer.cursor("cloud", ALL))] == ["scan-1"]


async def test_the_fresh_file_after_a_corrupt_one_remembers_what_the_damaged_one_did(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer, cursor, _, _ = await _damaged_buffer(path)
    try:
        remembered = buffer.dedupe_status()["ids"]
        assert remembered == 40
        made = [event(id="tx-after"), event(id="tx-after-2")]
        await asyncio.wait_for(buffer.append(made), 10)  # the commit finds the damage: written to a fresh file
        assert buffer.quarantined is not None
        await take_all(buffer, cursor)
    finally:
        await buffer.close()
    async with opened(path) as buffer:
        assert buffer.quarantined is None
        assert buffer.dedupe_status()["ids"] == remembered + 2
        await store(buffer, [event(id="tx-after"), event(id="tx-new")])
        assert buffer.duplicates_suppressed == 1


# --- the in-memory window, against a model --------------------------------------------------------


@given(
    st.integers(min_value=1, max_value=8),
    st.floats(min_value=0.5, max_value=20),
    st.lists(st.tuples(st.lists(st.sampled_from("abcdefghij"), max_size=4), st.floats(0, 5)), max_size=30),
)
def test_recent_ids_keep_exactly_the_newest_within_window_and_bound(
    capacity: int, window: float, steps: list[tuple[list[str], float]]
) -> None:
    recent = RecentIds(capacity, window)
    model: list[tuple[str, float]] = []  # (id, accepted) in acceptance order
    now = 1000.0
    for ids, advance in steps:
        now += advance
        recent.remember(ids, now)
        for event_id in ids:
            if event_id not in [i for i, _ in model]:
                model.append((event_id, now))
        recent.trim(now)
        model = [(i, t) for i, t in model if t >= now - window][-capacity:] if capacity else []
        assert list(recent.order) == [i for i, _ in model]
        assert recent.ids == {i for i, _ in model}
        assert sum(int(count) for _, count in recent.groups) == len(model)
        assert recent.oldest(now) == (model[0][1] if model else now)
