"""The buffer keeps its promises under real faults.

- a genuine SQLITE_FULL (``max_page_count``) part way through a group commit;
- reads racing a write transaction that fails after its INSERT;
- bytes overwritten in the live file while the buffer has it open;
- a child process SIGKILLed at chosen points (``tests/buffer_fault_child.py``);
- sink config changes that orphan a cursor, across restarts.

No mocks and no sleeps as synchronisation: conditions are awaited with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.events import LANES, CloudEvent, decode_event, encode_event, format_sequence, make_event
from agent.sink import ACKED, BufferedEvent
from buffer import Buffer, BufferLocked, DeadLetter, DeliveryCursor
from tests.buffered import take_all
from tests.peers.waiting import wait_for

CHILD = Path(__file__).with_name("buffer_fault_child.py")
_counter = 0


def event(lane: str = "transaction", *, payload: str = "", id: str | None = None) -> CloudEvent:
    global _counter
    _counter += 1
    name = {"transaction": "production.completed", "operational": "machine.state.changed"}.get(
        lane, "telemetry.samples"
    )
    data: dict[str, Any] = {"work_order": f"WO-{_counter}", "payload": payload}
    if lane == "telemetry":
        data = {"samples": [{"tag": "t", "time": "2024-05-01T00:00:00Z", "value": _counter, "quality": "good"}]}
    from datetime import UTC, datetime

    return make_event(
        name,
        id=id or f"{lane}-{_counter}",
        source="plantgate/plant-01/gw/press7",
        time=datetime(2024, 5, 1, tzinfo=UTC),
        site="plant-01",
        subject=f"WO-{_counter}",
        data=data,
    )


def noise(n: int) -> str:
    """Incompressible text: ``n`` bytes of hex from the OS's random source."""
    return os.urandom(n // 2 + 1).hex()[:n]


def committed_rows(path: Path) -> dict[str, int]:
    """Events per lane as another connection sees them: committed data only."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return {
            lane: int(db.execute(f"SELECT coalesce(sum(count), 0) FROM lane_{lane}").fetchone()[0]) for lane in LANES
        }


def content(path: Path) -> bytes:
    return path.read_bytes()


def page_count(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return int(db.execute("PRAGMA page_count").fetchone()[0])


# --- a disk that fills up part way through a group commit -----------------------------------------


async def test_a_group_commit_that_fails_part_way_retries_only_what_did_not_commit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "buffer.db"
    buffer = Buffer(path, max_rows_per_commit=50, commit_retry_interval=0.05)
    await buffer.open()
    try:
        cursor = buffer.cursor("cloud", LANES)
        before = page_count(path)
        await buffer.append([event(payload=noise(2000)) for _ in range(50)])  # one transaction's worth
        per_chunk = page_count(path) - before
        assert per_chunk > 5
        # Room for one more transaction of 50 and a half: the second of three fails with SQLITE_FULL.
        await buffer.set_max_page_count(page_count(path) + per_chunk * 3 // 2)
        made = [event(payload=noise(2000)) for _ in range(150)]
        future = buffer.append(made)
        await wait_for(lambda: buffer.refusing_writes is not None, message="the commit fails: disk full")
        assert "full" in str(buffer.refusing_writes)
        assert committed_rows(path)["transaction"] == 100  # the first chunk of the group committed
        assert not future.done()
        waiter = asyncio.ensure_future(buffer.wait_writable())
        # It keeps retrying (and failing) while the disk is full; nothing is refused for good.
        await wait_for(lambda: caplog.text.count("Buffer commit failed") >= 3, message="retries")
        assert not waiter.done()

        await buffer.set_max_page_count(1 << 30)  # the disk frees up
        await asyncio.wait_for(future, 10)
        await asyncio.wait_for(waiter, 10)
        assert buffer.refusing_writes is None
        assert "UNIQUE constraint" not in caplog.text
        later = event()
        await buffer.append([later])  # writes accepted again, without a restart
        taken = await take_all(buffer, cursor)
    finally:
        await buffer.close()
    ids = [item.id for item in taken]
    assert ids[50:] == [e.id for e in made] + [later.id]  # each once, in order
    seqs = [item.seq for item in taken]
    assert seqs == sorted(set(seqs))


async def test_a_reader_never_sees_rows_of_a_transaction_that_rolls_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The group's rows are inserted, then its dead letter does not fit: the transaction rolls back, again
    and again, each time with awaits between INSERT and ROLLBACK. A sink reading all along gets nothing."""
    path = tmp_path / "buffer.db"
    buffer = Buffer(path, commit_retry_interval=0.01)
    await buffer.open()
    try:
        cursor = buffer.cursor("cloud", LANES)
        earlier = [event() for _ in range(3)]
        await buffer.append(earlier)  # committed, not yet acknowledged: the sink keeps reading the lane
        await buffer.set_max_page_count(page_count(path) + 16)
        made = [event() for _ in range(5)]
        big = DeadLetter(
            id="big",
            sink="-",
            reason="r",
            type=made[0].type,
            subject=None,
            lane="transaction",
            time=0.0,
            body=noise(400_000).encode(),
        )
        future = buffer.append(made, [big])
        seen: list[BufferedEvent] = []
        reads = 0

        async def read_all_along() -> None:
            nonlocal reads
            while True:
                seen.extend(await cursor.next_batch(100, wait=False))
                reads += 1
                await asyncio.sleep(0)

        reader = asyncio.create_task(read_all_along())
        try:
            await wait_for(lambda: caplog.text.count("Buffer commit failed") >= 20 and reads > 200, timeout=20)
            assert {item.id for item in seen} == {e.id for e in earlier}
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        await buffer.set_max_page_count(1 << 30)
        await asyncio.wait_for(future, 10)
        assert [item.id for item in await take_all(buffer, cursor)] == [e.id for e in earlier + made]
    finally:
        await buffer.close()


# --- corruption while running ---------------------------------------------------------------------

STAMP = re.compile(r"^buffer\.db\.corrupt-\d{8}T\d{6}Z(-\d+)?$")


async def _damaged_buffer(path: Path, start: int = 4096) -> tuple[Buffer, DeliveryCursor, list[int], bytes]:
    """A buffer reopened (cold caches) on a file whose bytes from ``start`` on were then overwritten."""
    buffer = Buffer(path, commit_retry_interval=0.05)
    await buffer.open()
    cursor = buffer.cursor("cloud", LANES)
    for _ in range(10):
        await buffer.append([event(payload=noise(3000)) for _ in range(4)])
    await buffer.close()
    buffer = Buffer(path, commit_retry_interval=0.05)
    await buffer.open()
    cursor = buffer.cursor("cloud", LANES)
    seqs = [buffer.last_sequence]
    data = bytearray(content(path))
    assert len(data) > 16 * 4096
    data[start:] = b"\xde\xad\xbe\xef" * ((len(data) - start) // 4)
    with path.open("r+b") as file:  # in place: the buffer's connections keep the same file
        file.write(data)
    return buffer, cursor, seqs, bytes(data)


@pytest.mark.parametrize("start", [0, 4096], ids=["header-and-pages", "b-tree-pages"])
async def test_corruption_seen_by_a_commit_moves_the_file_aside_and_goes_on_with_a_fresh_one(
    tmp_path: Path, start: int
) -> None:
    path = tmp_path / "buffer.db"
    buffer, cursor, seqs, damaged = await _damaged_buffer(path, start)
    try:
        state = buffer.save_state("opcua/press7/subscription", "17")
        made = [event(), event("operational")]
        future = buffer.append(made)
        await asyncio.wait_for(future, 10)  # written to the fresh file
        await state
        assert buffer.on_quarantine.is_set()
        quarantined = buffer.quarantined
        assert quarantined is not None and buffer.quarantines == [quarantined]
        moved_to = Path(quarantined["moved_to"])
        assert STAMP.match(moved_to.name), moved_to
        assert content(moved_to) == damaged  # byte for byte, never deleted
        assert quarantined["size_bytes"] == len(damaged)
        assert quarantined["path"] == str(path)
        assert "malformed" in quarantined["reason"] or "not a database" in quarantined["reason"]
        # The sequence goes on from where it was: never reused.
        assert [e.sequence for e in made] == [format_sequence(seqs[0] + 1), format_sequence(seqs[0] + 2)]
        assert buffer.refusing_writes is None
        taken = await take_all(buffer, cursor)
        assert [item.id for item in taken] == [e.id for e in made]
        assert await buffer.load_state("opcua/press7/subscription") == "17"
    finally:
        await buffer.close()
    buffer = Buffer(path)
    await buffer.open()  # the fresh file is a sound buffer
    try:
        assert buffer.quarantined is None
        assert buffer.last_sequence == seqs[0] + 2
        assert await buffer.load_state("opcua/press7/subscription") == "17"
    finally:
        await buffer.close()


async def test_corruption_seen_by_a_read_is_quarantined_too(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer, cursor, _, damaged = await _damaged_buffer(path)
    try:
        reader = buffer._reader
        assert reader is not None
        await reader.execute("PRAGMA cache_size=0")  # the reader's cached pages are not the file's
        await reader.execute("PRAGMA shrink_memory")
        assert await cursor.next_batch(1000, wait=False) == []  # nothing handed out from a damaged file
        await wait_for(buffer.on_quarantine.is_set, message="quarantined")
        assert content(Path(buffer.quarantines[0]["moved_to"])) == damaged
        newer = event()
        await buffer.append([newer])
        assert [item.id for item in await take_all(buffer, cursor)] == [newer.id]
    finally:
        await buffer.close()


# --- kill -9 at chosen points ----------------------------------------------------------------------


def run_child(path: Path, point: str) -> dict[str, list[str]]:
    """Run the child until it says it reached ``point``, SIGKILL it there, return what it printed."""
    process = subprocess.Popen(
        [sys.executable, str(CHILD), str(path), point],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parent.parent,
    )
    said: dict[str, list[str]] = {"committed": [], "acked": []}
    try:
        assert process.stdout is not None
        for line in process.stdout:
            word, *rest = line.split()
            if word == "at":
                assert rest == [point]
                break
            said[word].extend(rest)
        else:
            raise AssertionError(f"child ended early: {process.stderr.read() if process.stderr else ''}")
        process.kill()
        process.wait(timeout=30)
    finally:
        if process.returncode is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
    assert process.returncode == -9
    return said


@pytest.mark.parametrize("point", ["commit", "ack", "delete"])
async def test_kill_9_at_any_point_loses_nothing_acknowledged_and_reuses_no_sequence(
    tmp_path: Path, point: str
) -> None:
    path = tmp_path / "buffer.db"
    said = await asyncio.to_thread(run_child, path, point)
    assert said["committed"]
    buffer = Buffer(path)
    await buffer.open()  # the lock died with the child
    try:
        assert buffer.quarantined is None
        cursor = buffer.cursor("cloud", LANES)
        taken = await take_all(buffer, cursor)
        newer = event()
        await buffer.append([newer])
    finally:
        await buffer.close()
    after = [item.id for item in taken]
    delivered = set(said["acked"]) | set(after)
    # Every event whose commit was acknowledged is delivered (before the kill, or after it).
    assert set(said["committed"]) <= delivered
    if point == "ack":
        # Acknowledged by the sink but the cursor never committed: delivered again, same id.
        assert set(said["acked"]) <= set(after)
    if point == "commit":
        assert "fact-20" not in after  # never committed, never promised
    # Same id, same body on redelivery; sequences strictly increasing, and the next one is new.
    for item in taken:
        assert decode_event(item.body)["id"] == item.id
    seqs = [item.seq for item in taken]
    assert seqs == sorted(set(seqs))
    assert newer.sequence is not None and int(newer.sequence) > max(seqs, default=0)


# --- a sink's lanes change: orphaned cursors ---------------------------------------------------------


async def test_a_lane_a_sink_no_longer_takes_keeps_its_backlog_as_orphaned_but_nothing_newer(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = Buffer(path)
    await buffer.open()
    buffer.cursor("cloud", LANES)
    buffer.cursor("erp", ["transaction", "operational"])
    buffer.cursor("old", ["transaction"])
    old_backlog = [event() for _ in range(3)]
    await buffer.append(old_backlog)
    await buffer.close()

    # erp no longer takes transactions; "old" is gone from the config.
    config = {"cloud": LANES, "erp": ["operational"]}
    buffer = Buffer(path, sinks=config)
    await buffer.open()
    try:
        cloud = buffer.cursor("cloud", LANES)
        erp = buffer.cursor("erp", ["operational"])
        newer = [event() for _ in range(5)]
        await buffer.append(newer)
        await take_all(buffer, cloud)
        await take_all(buffer, erp)
        stats = await buffer.stats()
        assert stats.orphaned == {"erp": 3, "old": 3}
        assert set(stats.sinks) == {"cloud", "erp"}
        assert set(stats.sinks["erp"].lanes) == {"operational"}
        assert committed_rows(path)["transaction"] == 3  # the newer five are gone, the backlog stays
    finally:
        await buffer.close()

    buffer = Buffer(path, sinks=config)  # a restart keeps where they were frozen
    await buffer.open()
    try:
        cloud = buffer.cursor("cloud", LANES)
        await buffer.append([event() for _ in range(4)])
        await take_all(buffer, cloud)
        assert (await buffer.stats()).orphaned == {"erp": 3, "old": 3}
        assert committed_rows(path)["transaction"] == 3
        # erp takes transactions again: it gets its old backlog (what is left of it).
        await buffer.configure_sinks({"cloud": LANES, "erp": ["transaction", "operational"]})
        erp = buffer.cursor("erp", ["transaction", "operational"])
        assert [item.id for item in await take_all(buffer, erp)] == [e.id for e in old_backlog]
        assert (await buffer.stats()).orphaned == {"old": 3}
        assert await buffer.purge_sink("old") == {"transaction": 3}
        assert (await buffer.stats()).orphaned == {}
        assert committed_rows(path)["transaction"] == 0
    finally:
        await buffer.close()


# --- state and lock ---------------------------------------------------------------------------------


async def test_state_is_saved_with_the_next_commit_and_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = Buffer(path)
    await buffer.open()
    assert await buffer.load_state("opcua/press7") is None
    await buffer.save_state("opcua/press7", '{"subscription": 4}')
    buffer.save_state("gone", "x")
    await buffer.save_state("gone", None)
    await buffer.close()
    buffer = Buffer(path)
    await buffer.open()
    try:
        assert await buffer.load_state("opcua/press7") == '{"subscription": 4}'
        assert await buffer.load_state("gone") is None
    finally:
        await buffer.close()


async def test_a_file_open_for_writing_is_locked_against_a_second_writer(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = Buffer(path)
    await buffer.open()
    try:
        with pytest.raises(
            BufferLocked, match=f"agent is running: {re.escape(str(path))} is in use by process {os.getpid()}"
        ):
            await Buffer(path).open()
        reader = Buffer(path)
        await reader.open(readonly=True)  # inspection needs no lock
        await reader.close()
    finally:
        await buffer.close()
    again = Buffer(path)
    await again.open()
    await again.close()


# --- property: a disk that fills and frees at any moment loses and duplicates nothing ----------------

_append = st.tuples(st.just("append"), st.lists(st.sampled_from(LANES), min_size=1, max_size=20))
_full = st.tuples(st.just("full"), st.integers(min_value=0, max_value=3))
fault_op = st.one_of(  # appends and full disks weighted up: the interesting interleavings
    _append,
    _append,
    _append,
    _full,
    _full,
    st.tuples(st.just("free")),
    st.tuples(st.just("take"), st.sampled_from([1, 7, 1000])),
    st.tuples(st.just("settle")),
)


async def _disk_scenario(path: Path, ops: list[tuple[Any, ...]]) -> None:
    buffer = Buffer(path, synchronous="NORMAL", max_rows_per_commit=8, commit_retry_interval=0.005)
    await buffer.open()
    try:
        cursor = buffer.cursor("cloud", LANES)
        await buffer.commit_now()
        appended: dict[str, CloudEvent] = {}
        futures: list[asyncio.Future[None]] = []
        delivered: list[BufferedEvent] = []
        outstanding: list[BufferedEvent] = []
        for op in ops:
            if op[0] == "append":
                made = [event(lane, payload=noise(4000)) for lane in op[1]]
                appended.update((e.id, e) for e in made)
                future = buffer.append(made)
                futures.append(future)
                # Its commit either succeeds or hits the full disk before the next operation.
                await wait_for(lambda f=future: f.done() or buffer.refusing_writes is not None, interval=0.001)
            elif op[0] == "full":
                await buffer.set_max_page_count(page_count(path) + op[1])
            elif op[0] == "free":
                await buffer.set_max_page_count(1 << 30)
            elif op[0] == "take" and not outstanding:
                outstanding = await cursor.next_batch(op[1], wait=False)
            elif op[0] == "settle" and outstanding:
                cursor.settle(outstanding, [ACKED] * len(outstanding))
                delivered.extend(outstanding)
                outstanding = []
        await buffer.set_max_page_count(1 << 30)
        await asyncio.wait_for(asyncio.gather(*futures), 20)
        assert buffer.refusing_writes is None
        delivered.extend(await take_all(buffer, cursor))
    finally:
        await buffer.close()
    ids = [item.id for item in delivered]
    assert sorted(ids) == sorted(appended)  # every event, each exactly once (every outcome was ACKED)
    for lane in LANES:
        seqs = [item.seq for item in delivered if item.lane == lane]
        assert seqs == sorted(set(seqs))
    for item in delivered:
        assert item.body == encode_event(appended[item.id])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(fault_op, min_size=3, max_size=25))
def test_a_disk_that_fills_and_frees_at_any_moment_loses_and_duplicates_nothing(ops: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(_disk_scenario(Path(directory) / "buffer.db", ops))
