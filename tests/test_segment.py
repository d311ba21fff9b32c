"""A segment's stored form (``buffer.segment``): Zstandard now, and what earlier versions wrote still reads."""

from __future__ import annotations

import sqlite3
import zlib
from datetime import UTC, datetime
from pathlib import Path

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from agent.events import CloudEvent, make_event
from agent.sink import BufferedEvent
from buffer import Buffer
from buffer.segment import LazySegment, pack_segment, unpack_segment

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

events_strategy = st.lists(
    st.builds(
        BufferedEvent,
        seq=st.integers(min_value=1, max_value=2**62),
        lane=st.sampled_from(["transaction", "operational", "telemetry"]),
        type=st.text(max_size=40),
        id=st.text(min_size=1, max_size=40),
        body=st.binary(max_size=300),
        enqueued=st.floats(allow_nan=False, allow_infinity=False),
    ),
    max_size=50,
)


@given(events_strategy)
def test_every_stored_form_reads_back_the_same_events(events: list[BufferedEvent]) -> None:
    plain = msgspec.msgpack.encode(events)
    packed = pack_segment(events)
    assert packed[:4] == ZSTD_MAGIC
    for blob in (packed, zlib.compress(plain, 1), plain):  # now, before, at first
        assert unpack_segment(blob) == events
        lazy = LazySegment(blob)
        assert len(lazy) == len(events)
        assert list(lazy) == events
        if events:
            assert lazy[len(events) - 1] == events[-1]


def transaction(n: int) -> CloudEvent:
    return make_event(
        "production.completed",
        source="plantgate://test/press",
        site="plant-01",
        time=datetime(2025, 1, 1, tzinfo=UTC),
        data={"work_order": f"WO-{n}", "quantity": n, "uom": "pcs"},
        id=f"old-{n}",
    )


async def test_a_file_written_with_zlib_segments_delivers_them(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = Buffer(path)
    await buffer.open()
    buffer.cursor("cloud", ["transaction"])
    await buffer.append([transaction(n) for n in range(5)])
    await buffer.close()
    with sqlite3.connect(path) as db:  # as an earlier version wrote them
        for first, blob in db.execute("SELECT first_seq, events FROM lane_transaction").fetchall():
            plain = msgspec.msgpack.encode(unpack_segment(blob))
            db.execute("UPDATE lane_transaction SET events = ? WHERE first_seq = ?", (zlib.compress(plain, 1), first))
    buffer = Buffer(path)
    await buffer.open()
    try:
        cursor = buffer.cursor("cloud", ["transaction"])
        batch = await cursor.next_batch(100, wait=False)
        assert [event.id for event in batch] == [f"old-{n}" for n in range(5)]
        await buffer.append([transaction(5)])
        batch = await cursor.next_batch(100, wait=False)
        assert [event.id for event in batch] == [f"old-{n}" for n in range(6)]  # old and new side by side
    finally:
        await buffer.close()
