"""The SQLite store-and-forward buffer: durability, per-sink cursors, lanes, dedupe, telemetry cap, corruption.

Everything runs against a real SQLite file in ``tmp_path``; crash tests kill a real
child process. ``stored_events`` peeks into the file with sqlite3 (read-only) where
the only observable is whether rows were deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.events import (
    LANE_OF_TYPE,
    LANES,
    CloudEvent,
    Lane,
    Sample,
    TelemetrySamples,
    decode_event,
    encode_event,
    format_sequence,
    make_event,
)
from agent.sink import ACKED, RETRY, BufferedEvent, Outcome, Rejected
from buffer import NO_SINK, Buffer, DeadLetter, Eviction, inspect_dead_letters, inspect_stats
from tests.buffered import take_all

T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
NAME_OF_LANE: dict[Lane, str] = {
    "transaction": "production.completed",
    "operational": "machine.state.changed",
    "telemetry": "telemetry.samples",
}
_counter = 0


def event(lane: Lane = "transaction", *, id: str | None = None, subject: str | None = None) -> CloudEvent:
    """A canonical event of ``lane`` with a fresh id (unless given)."""
    global _counter
    _counter += 1
    name = NAME_OF_LANE[lane]
    data: Any = {"work_order": f"WO-{_counter}"}
    if lane == "telemetry":
        data = TelemetrySamples(samples=[Sample("press7.temperature", T0, float(_counter))])
    return make_event(
        name,
        id=id or f"{lane}-{_counter}",
        source="plantgate/plant-01/gw/press7",
        time=T0 + timedelta(seconds=_counter),
        site="plant-01",
        subject=subject if subject is not None else f"WO-{_counter}",
        data=data,
    )


def samples_event(source: str, start: datetime, tags: Sequence[str], *, id: str) -> CloudEvent:
    """A telemetry.samples event of ``source`` holding one sample per tag, at ``start`` + index seconds."""
    samples = [Sample(tag, start + timedelta(seconds=index), float(index)) for index, tag in enumerate(tags)]
    return make_event(
        "telemetry.samples",
        id=id,
        source=f"plantgate/plant-01/gw/{source}",
        time=start,
        site="plant-01",
        subject=source,
        partitionkey=source,
        data=TelemetrySamples(samples=samples),
    )


async def open_buffer(path: Path, **options: Any) -> Buffer:
    buffer = Buffer(path, **options)
    await buffer.open()
    return buffer


@pytest.fixture
async def buffer(tmp_path: Path) -> AsyncIterator[Buffer]:
    buffer = await open_buffer(tmp_path / "buffer.db")
    yield buffer
    await buffer.close()


def content(path: Path) -> bytes:
    return path.read_bytes()


def stored_events(path: Path) -> dict[str, int]:
    """Events still stored per lane table (white box: whether delivered rows were deleted)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return {
            lane: int(db.execute(f"SELECT coalesce(sum(count), 0) FROM lane_{lane}").fetchone()[0]) for lane in LANES
        }


# --- append, commit, reopen ----------------------------------------------------------------------


async def test_append_resolves_once_committed(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = await open_buffer(path)
    try:
        buffer.cursor("cloud", LANES)
        future = buffer.append([event(), event("operational"), event("telemetry")])
        assert not future.done()  # the commit happens in the commit loop, not inside append
        await future
        # Another connection sees it: it is in the file, not only in memory.
        stats = await inspect_stats(path, ["cloud"])
        assert stats.sinks["cloud"].depth == 3
        assert {lane: s.depth for lane, s in stats.sinks["cloud"].lanes.items()} == dict.fromkeys(LANES, 1)
    finally:
        await buffer.close()


async def test_events_survive_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = await open_buffer(path)
    buffer.cursor("cloud", LANES)
    made = [event(), event("operational"), event("telemetry"), event()]
    await buffer.append(made)
    await buffer.close()

    buffer = await open_buffer(path)
    try:
        cursor = buffer.cursor("cloud", LANES)
        assert cursor.depth() == 4
        taken = await take_all(buffer, cursor)
    finally:
        await buffer.close()
    assert sorted(item.id for item in taken) == sorted(e.id for e in made)
    assert {item.id: item.body for item in taken} == {e.id: encode_event(e) for e in made}


async def test_each_body_is_the_encoded_event_with_its_sequence(buffer: Buffer) -> None:
    cursor = buffer.cursor("cloud", LANES)
    made = [event(), event("operational", subject=""), event("telemetry")]
    await buffer.append(made)
    taken = await cursor.next_batch(1000, wait=False)
    by_id = {e.id: e for e in made}
    assert len(taken) == 3
    for item in taken:
        original = by_id[item.id]
        body = decode_event(item.body)
        assert body == decode_event(encode_event(original))
        assert body["sequence"] == format_sequence(item.seq) == original.sequence
        assert body["id"] == item.id
        assert body["type"] == item.type == original.type
        assert item.lane == original.lane == LANE_OF_TYPE[original.type.removeprefix("io.plantgate.")]


async def test_sequence_strictly_increases_across_reopen_even_when_everything_was_delivered(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    seen: list[int] = []
    for round_ in range(3):
        buffer = await open_buffer(path)
        try:
            cursor = buffer.cursor("cloud", LANES)
            await buffer.append([event(), event("telemetry"), event("operational")])
            taken = await take_all(buffer, cursor)
            assert len(taken) == 3, round_
            seen.extend(sorted(item.seq for item in taken))
        finally:
            await buffer.close()
        assert stored_events(path) == dict.fromkeys(LANES, 0)  # delivered and deleted
    assert seen == sorted(seen)
    assert len(set(seen)) == len(seen) == 9
    buffer = await open_buffer(path)
    try:
        assert buffer.last_sequence == seen[-1]
    finally:
        await buffer.close()


# --- cursors and lanes --------------------------------------------------------------------------


async def test_two_sinks_each_get_every_event_of_their_lanes(buffer: Buffer) -> None:
    erp = buffer.cursor("erp", ["transaction"])
    cloud = buffer.cursor("cloud", ["operational", "telemetry"])
    both = buffer.cursor("archive", ["transaction", "telemetry"])
    made = [event(lane) for lane in ("telemetry", "transaction", "operational", "transaction", "telemetry")]
    await buffer.append(made)

    def ids(lanes: set[str]) -> list[str]:
        return sorted(e.id for e in made if e.lane in lanes)

    erp_taken = await take_all(buffer, erp)
    assert sorted(item.id for item in erp_taken) == ids({"transaction"})
    # erp's acknowledgements did not move the others
    assert sorted(item.id for item in await take_all(buffer, cloud)) == ids({"operational", "telemetry"})
    assert sorted(item.id for item in await take_all(buffer, both)) == ids({"transaction", "telemetry"})
    assert erp.depth() == cloud.depth() == both.depth() == 0


async def test_transactions_drain_before_operational_before_telemetry(buffer: Buffer) -> None:
    cursor = buffer.cursor("cloud", LANES)
    await buffer.append([event("telemetry") for _ in range(3)])
    await buffer.append([event("operational") for _ in range(2)])
    await buffer.append([event("transaction") for _ in range(2)])
    batch = await cursor.next_batch(1000, wait=False)
    assert [item.lane for item in batch] == ["transaction"] * 2 + ["operational"] * 2 + ["telemetry"] * 3
    # within a lane, in sequence order
    for lane in LANES:
        seqs = [item.seq for item in batch if item.lane == lane]
        assert seqs == sorted(seqs)
    # a small batch takes from the transaction lane first
    small = await cursor.next_batch(2, wait=False)
    assert [item.lane for item in small] == ["transaction", "transaction"]


async def test_settle_acked_advances(buffer: Buffer) -> None:
    cursor = buffer.cursor("cloud", LANES)
    made = [event() for _ in range(4)]
    await buffer.append(made)
    batch = await cursor.next_batch(1000, wait=False)
    settlement = cursor.settle(batch[:2], [ACKED, ACKED])
    assert [item.id for item in settlement.acked] == [made[0].id, made[1].id]
    assert (settlement.retry, settlement.rejected) == (0, [])
    assert cursor.depth() == 2
    rest = await cursor.next_batch(1000, wait=False)
    assert [item.id for item in rest] == [made[2].id, made[3].id]


async def test_retry_redelivers_from_the_first_retry_of_its_lane(buffer: Buffer) -> None:
    cursor = buffer.cursor("cloud", LANES)
    tx = [event() for _ in range(5)]
    ops = [event("operational") for _ in range(2)]
    await buffer.append(tx + ops)
    batch = await cursor.next_batch(1000, wait=False)
    assert [item.id for item in batch] == [e.id for e in tx + ops]
    outcomes: list[Outcome] = [ACKED, ACKED, RETRY, ACKED, Rejected("later one, after a retry"), ACKED, ACKED]
    settlement = cursor.settle(batch, outcomes)
    assert settlement.retry == 1
    assert settlement.rejected == []  # behind the retry: not settled, handed out again
    assert [item.id for item in settlement.acked] == [tx[0].id, tx[1].id, ops[0].id, ops[1].id]
    again = await cursor.next_batch(1000, wait=False)
    # the operational lane was not blocked by the transaction lane's retry
    assert [item.id for item in again] == [tx[2].id, tx[3].id, tx[4].id]
    assert [item.body for item in again] == [item.body for item in batch[2:5]]
    assert [item.seq for item in again] == [item.seq for item in batch[2:5]]
    await buffer.commit_now()
    assert await buffer.dead_letters() == []
    with pytest.raises(ValueError):
        cursor.settle(again, [ACKED])


async def test_rejected_becomes_a_dead_letter_and_advances(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = await open_buffer(path)
    try:
        cursor = buffer.cursor("erp", ["transaction", "operational"])
        made = [event(subject="4711"), event(), event("operational", subject="press7.state")]
        await buffer.append(made)
        batch = await cursor.next_batch(1000, wait=False)
        settlement = cursor.settle(batch, [Rejected("422: unknown work order"), ACKED, Rejected("schema")])
        assert [(item.id, reason) for item, reason in settlement.rejected] == [
            (made[0].id, "422: unknown work order"),
            (made[2].id, "schema"),
        ]
        assert cursor.depth() == 0
        assert await cursor.next_batch(1000, wait=False) == []
        await buffer.commit_now()
        letters = await buffer.dead_letters()
        assert buffer.dead_letter_count == 2
    finally:
        await buffer.close()
    first, second = letters
    assert (first.sink, first.reason, first.id, first.type, first.subject, first.lane) == (
        "erp",
        "422: unknown work order",
        made[0].id,
        "io.plantgate.production.completed",
        "4711",
        "transaction",
    )
    assert (second.sink, second.reason, second.id, second.type, second.subject, second.lane) == (
        "erp",
        "schema",
        made[2].id,
        "io.plantgate.machine.state.changed",
        "press7.state",
        "operational",
    )
    assert decode_event(first.body) == decode_event(encode_event(made[0]))
    # kept across a restart, listed by sink
    buffer = await open_buffer(path)
    try:
        assert [d.id for d in await buffer.dead_letters("erp")] == [made[0].id, made[2].id]
        assert await buffer.dead_letters("cloud") == []
        assert buffer.dead_letter_count == 2
        assert buffer.cursor("erp", ["transaction", "operational"]).depth() == 0
    finally:
        await buffer.close()


async def test_dead_letters_made_before_any_sink_are_stored_with_the_append(buffer: Buffer) -> None:
    made = event()
    letter = DeadLetter(
        id=made.id,
        sink=NO_SINK,
        reason="item: item code 'P-100-OLD' is obsolete",
        type=made.type,
        subject=made.subject,
        lane="transaction",
        time=1.0,
        body=encode_event(made),
    )
    await buffer.append([], [letter])
    assert await buffer.dead_letters(NO_SINK) == [letter]


# --- deletion, backlog, orphans -------------------------------------------------------------------


async def test_rows_are_removed_only_after_every_sink_of_their_lane_acked(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = await open_buffer(path)
    fast = buffer.cursor("fast", ["transaction", "telemetry"])
    slow = buffer.cursor("slow", ["transaction"])
    made = [event(), event(), event("telemetry")]
    await buffer.append(made)
    assert len(await take_all(buffer, fast)) == 3
    await buffer.close()
    # telemetry is nobody else's: gone; the transactions wait for `slow`
    assert stored_events(path) == {"transaction": 2, "operational": 0, "telemetry": 0}

    buffer = await open_buffer(path)
    try:
        stats = await buffer.stats(["fast", "slow"])
        assert stats.sinks["fast"].depth == 0
        assert stats.sinks["slow"].depth == 2
        assert stats.sinks["slow"].lanes["transaction"].depth == 2
        age = stats.sinks["slow"].lanes["transaction"].oldest_age_seconds
        assert age is not None and age >= 0
        assert stats.orphaned == {}
        slow = buffer.cursor("slow", ["transaction"])
        taken = await take_all(buffer, slow)
        assert [item.id for item in taken] == [made[0].id, made[1].id]
    finally:
        await buffer.close()
    assert stored_events(path) == dict.fromkeys(LANES, 0)


async def test_a_sink_no_longer_configured_keeps_its_backlog_as_orphaned(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = await open_buffer(path)
    buffer.cursor("cloud", LANES)
    buffer.cursor("old-erp", ["transaction"])
    await buffer.append([event(), event(), event("operational")])
    await buffer.close()

    # "old-erp" was renamed away in the config: only "cloud" is configured now
    buffer = await open_buffer(path)
    try:
        cloud = buffer.cursor("cloud", LANES)
        assert len(await take_all(buffer, cloud)) == 3
        await buffer.append([event()])
        assert len(await take_all(buffer, cloud)) == 1
        stats = await buffer.stats(configured_sinks=["cloud"])
        assert stats.orphaned == {"old-erp": 3}
        assert set(stats.sinks) == {"cloud"}
        assert stats.sinks["cloud"].depth == 0
        assert (await buffer.stats()).sinks["old-erp"].depth == 3  # without a config: every sink listed
        # the `buffer stats --json` shape (contract)
        shape = msgspec.json.decode(msgspec.json.encode(stats))
        assert set(shape) == {"sinks", "dead_letters", "orphaned", "size_bytes"}
        assert set(shape["sinks"]["cloud"]) == {"depth", "lanes"}
        assert shape["sinks"]["cloud"]["lanes"]["transaction"] == {"depth": 0, "oldest_age_seconds": None}
        assert shape["orphaned"] == {"old-erp": 3}
    finally:
        await buffer.close()
    assert stored_events(path)["transaction"] == 3  # never deleted by config
    assert (await inspect_stats(path, ["cloud"])).orphaned == {"old-erp": 3}

    # renamed back: the backlog is still deliverable
    buffer = await open_buffer(path)
    try:
        assert len(await take_all(buffer, buffer.cursor("old-erp", ["transaction"]))) == 3
    finally:
        await buffer.close()


async def test_a_new_sink_starts_at_the_head(buffer: Buffer) -> None:
    """A sink added to the config takes events from now on; the old backlog belongs to the sinks that had it."""
    buffer.cursor("cloud", LANES)
    await buffer.append([event()])
    late = buffer.cursor("late", LANES)
    assert late.depth() == 0
    newer = event()
    await buffer.append([newer])
    assert [item.id for item in await late.next_batch(1000, wait=False)] == [newer.id]


async def test_a_sink_created_while_an_append_is_pending_reports_what_it_will_get(buffer: Buffer) -> None:
    """The agent appends agent.started before its cursors exist on a fresh buffer: no phantom depth."""
    pending = buffer.append([event("operational")])
    cursor = buffer.cursor("cloud", LANES)
    await pending
    await buffer.commit_now()
    batch = await cursor.next_batch(1000, wait=False)
    assert cursor.depth() == len(batch)


async def test_a_small_batch_size_makes_progress_while_another_sink_lags(buffer: Buffer) -> None:
    fast = buffer.cursor("fast", ["transaction"])
    buffer.cursor("down", ["transaction"])  # a sink that is unreachable: never acks
    for _ in range(3):
        await buffer.append([event()])  # one commit, one segment each
    first = await fast.next_batch(10, wait=False)
    assert len(first) >= 1
    fast.settle(first, [ACKED] * len(first))
    await buffer.commit_now()
    assert fast.depth() == 3 - len(first)
    second = await fast.next_batch(10, wait=False)
    assert len(second) == fast.depth()


# --- crashes --------------------------------------------------------------------------------------

CHILD = r"""
import asyncio, os, sys
from datetime import UTC, datetime
from pathlib import Path

from agent.events import make_event
from agent.sink import ACKED
from buffer import Buffer

path, mode, count, acks = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

async def main():
    buffer = Buffer(path)
    await buffer.open()
    cursor = buffer.cursor("cloud", ["transaction", "operational", "telemetry"])
    made = [
        make_event(
            "production.completed", id=f"crash-{n}", source="plantgate/plant-01/gw/press7",
            time=datetime(2024, 5, 1, tzinfo=UTC), site="plant-01", subject=f"WO-{n}", data={"n": n},
        )
        for n in range(count)
    ]
    await buffer.append(made)
    if acks:
        batch = await cursor.next_batch(1000, wait=False)
        cursor.settle(batch[:acks], [ACKED] * acks)
        await buffer.commit_now()
    print("committed", flush=True)
    if mode == "exit":
        os._exit(0)  # no close(), no atexit, no flush of anything
    sys.stdin.readline()  # wait for the SIGKILL

asyncio.run(main())
"""


def run_child_until_killed(path: Path, mode: str, count: int, acks: int = 0) -> None:
    """Run CHILD: it commits, says so, then exits hard or is SIGKILLed by us, without close()."""
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), mode, str(count), str(acks)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line == "committed\n", process.stderr.read() if process.stderr else ""
        if mode == "sigkill":
            process.kill()
        process.wait(timeout=30)
    finally:
        if process.returncode is None:
            process.kill()
            process.wait()
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()
    assert process.returncode == (0 if mode == "exit" else -9)


@pytest.mark.parametrize("mode", ["exit", "sigkill"])
async def test_committed_events_survive_a_hard_kill(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "buffer.db"
    await asyncio.to_thread(run_child_until_killed, path, mode, 20)
    assert path.with_name("buffer.db-wal").exists()  # not closed: the commits are still in the WAL
    buffer = await open_buffer(path)
    try:
        assert buffer.quarantined is None
        cursor = buffer.cursor("cloud", LANES)
        assert cursor.depth() == 20
        taken = await take_all(buffer, cursor)
        assert [item.id for item in taken] == [f"crash-{n}" for n in range(20)]
        assert [decode_event(item.body)["data"]["n"] for item in taken] == list(range(20))
        assert buffer.last_sequence == 20
        newer = event()
        await buffer.append([newer])
        assert newer.sequence == format_sequence(21)
    finally:
        await buffer.close()


async def test_an_ack_committed_before_a_kill_is_not_delivered_again(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    await asyncio.to_thread(run_child_until_killed, path, "sigkill", 10, 6)
    buffer = await open_buffer(path)
    try:
        cursor = buffer.cursor("cloud", LANES)
        assert cursor.depth() == 4
        taken = await take_all(buffer, cursor)
        assert [item.id for item in taken] == [f"crash-{n}" for n in range(6, 10)]
    finally:
        await buffer.close()


# --- dedupe ---------------------------------------------------------------------------------------


async def test_duplicate_ids_of_transactions_and_operational_events_are_stored_once(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = await open_buffer(path)
    cursor = buffer.cursor("cloud", LANES)
    tx, op = event(id="fact-1"), event("operational", id="fact-2")
    replayed_tx, replayed_op = event(id="fact-1"), event("operational", id="fact-2")
    await buffer.append([tx, op, event(id="fact-1")])
    await buffer.append([replayed_tx, replayed_op])
    assert buffer.duplicates_suppressed == 3
    assert replayed_tx.sequence is None  # never stored, so never numbered
    # telemetry is not deduped: samples of the same id are stored twice
    await buffer.append([event("telemetry", id="sample-1"), event("telemetry", id="sample-1")])
    assert buffer.duplicates_suppressed == 3
    assert cursor.depth("transaction") == cursor.depth("operational") == 1
    assert cursor.depth("telemetry") == 2
    await buffer.close()

    buffer = await open_buffer(path)  # still buffered: the ids are remembered across the restart
    try:
        assert buffer.duplicates_suppressed == 0
        await buffer.append([event(id="fact-1"), event("operational", id="fact-2"), event(id="fact-3")])
        assert buffer.duplicates_suppressed == 2
        taken = await take_all(buffer, buffer.cursor("cloud", LANES))
        assert sorted(item.id for item in taken) == ["fact-1", "fact-2", "fact-3", "sample-1", "sample-1"]
    finally:
        await buffer.close()


# --- telemetry cap --------------------------------------------------------------------------------


async def test_the_telemetry_cap_evicts_the_oldest_telemetry_first(tmp_path: Path) -> None:
    cap, per_commit = 50, 10
    buffer = await open_buffer(tmp_path / "buffer.db", telemetry_max_rows=cap)
    try:
        cursor = buffer.cursor("cloud", LANES)
        made: list[CloudEvent] = []
        transactions: list[CloudEvent] = []
        tags = {"press7": ["press7.temperature", "press7.pressure"], "oven1": ["oven1.temperature"]}
        for batch_number in range(20):
            batch = []
            for index in range(per_commit):
                n = batch_number * per_commit + index
                source = "press7" if n % 2 else "oven1"
                batch.append(samples_event(source, T0 + timedelta(seconds=10 * n), tags[source], id=f"t-{n}"))
            transactions.append(event())
            made.extend(batch)
            await buffer.append([*batch, transactions[-1]])
            # bounded at every commit (one commit late: see the xfail test below)
            assert cursor.depth("telemetry") <= cap + max(1, cap // 100) + per_commit
            assert cursor.depth("transaction") == len(transactions)
        await buffer.commit_now()
        assert cursor.depth("telemetry") <= cap + max(1, cap // 100)
        stats = await buffer.stats(["cloud"])
        assert stats.sinks["cloud"].lanes["telemetry"].depth == cursor.depth("telemetry")
        assert buffer.on_eviction.is_set()
        evictions = list(buffer.evictions)
        taken = await take_all(buffer, cursor)
    finally:
        await buffer.close()

    kept = [item.id for item in taken if item.lane == "telemetry"]
    assert 0 < len(kept) <= cap + max(1, cap // 100)
    # the newest survive: what is kept is a suffix of what was appended
    assert kept == [e.id for e in made[-len(kept) :]]
    # transactions are never evicted
    assert [item.id for item in taken if item.lane == "transaction"] == [e.id for e in transactions]

    evicted = made[: len(made) - len(kept)]
    assert all(isinstance(e, Eviction) for e in evictions)
    assert {e.source for e in evictions} == {"press7", "oven1"}
    for source in ("press7", "oven1"):
        mine = [e for e in evicted if e.source.endswith("/" + source)]
        reported = [e for e in evictions if e.source == source]
        times = [sample.time for e in mine for sample in e.data.samples]
        assert sum(e.events for e in reported) == len(mine)
        assert sum(e.samples for e in reported) == len(mine) * len(tags[source])
        assert min(e.start for e in reported) == min(times)
        assert max(e.end for e in reported) == max(times)
        assert {tag for e in reported for tag in e.tags} == set(tags[source])


async def test_the_telemetry_cap_holds_right_after_the_commit_that_crosses_it(tmp_path: Path) -> None:
    cap = 100
    buffer = await open_buffer(tmp_path / "buffer.db", telemetry_max_rows=cap)
    try:
        cursor = buffer.cursor("cloud", LANES)
        await buffer.append([event("telemetry") for _ in range(300)])
        assert cursor.depth("telemetry") <= cap + max(1, cap // 100)
    finally:
        await buffer.close()


# --- corruption -----------------------------------------------------------------------------------

STAMP = re.compile(r"^buffer\.db\.corrupt-(\d{8}T\d{6}Z)$")


async def test_a_corrupt_file_is_moved_aside_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    garbage = bytes(range(256)) * 40 + b"not a database"
    path.write_bytes(garbage)
    before = datetime.now(UTC).replace(microsecond=0)
    buffer = await open_buffer(path)
    after = datetime.now(UTC)
    try:
        quarantined = buffer.quarantined
        assert quarantined is not None
        moved_to = Path(quarantined["moved_to"])
        match = STAMP.match(moved_to.name)
        assert match, moved_to
        assert before <= datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC) <= after
        assert moved_to.parent == tmp_path
        assert content(moved_to) == garbage
        assert quarantined["path"] == str(path)
        assert quarantined["size_bytes"] == len(garbage)
        assert quarantined["reason"]
        # and a fresh, working buffer in its place
        cursor = buffer.cursor("cloud", LANES)
        await buffer.append([event()])
        assert len(await take_all(buffer, cursor)) == 1
    finally:
        await buffer.close()
    buffer = await open_buffer(path)
    try:
        assert buffer.quarantined is None
        assert buffer.last_sequence == 1
    finally:
        await buffer.close()
    assert content(moved_to) == garbage  # never deleted


async def test_a_corrupt_file_and_its_wal_are_moved_aside_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = await open_buffer(path)
    buffer.cursor("cloud", LANES)
    for n in range(40):
        await buffer.append([event(subject=f"{n}-" + "x" * 3000)])
    await buffer.close()  # checkpointed: the main file holds these
    await asyncio.to_thread(run_child_until_killed, path, "sigkill", 5)  # the WAL holds these
    data = bytearray(path.read_bytes())
    data[5 * 4096 : 7 * 4096] = b"\xde\xad\xbe\xef" * 2048
    path.write_bytes(bytes(data))
    wal = path.with_name("buffer.db-wal").read_bytes()
    assert wal
    buffer = await open_buffer(path)
    try:
        quarantined = buffer.quarantined
    finally:
        await buffer.close()
    assert quarantined is not None
    moved_to = Path(quarantined["moved_to"])
    stamp = moved_to.name.removeprefix("buffer.db.corrupt-")
    moved_wal = path.with_name(f"buffer.db-wal.corrupt-{stamp}")
    assert moved_wal.exists() and content(moved_wal) == wal
    assert content(moved_to) == bytes(data)


async def test_a_damaged_page_in_a_real_buffer_is_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = await open_buffer(path)
    buffer.cursor("cloud", LANES)
    for n in range(40):
        await buffer.append([event(subject=f"{n}-" + "x" * 3000)])
    await buffer.close()
    data = bytearray(path.read_bytes())
    assert len(data) > 8 * 4096
    data[5 * 4096 : 7 * 4096] = b"\xde\xad\xbe\xef" * 2048
    path.write_bytes(bytes(data))
    buffer = await open_buffer(path)
    try:
        assert buffer.quarantined is not None
        assert content(Path(buffer.quarantined["moved_to"])) == bytes(data)
        assert buffer.last_sequence == 0
    finally:
        await buffer.close()


# --- read-only inspection -------------------------------------------------------------------------


async def test_inspection_works_on_a_file_another_buffer_has_open(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    buffer = await open_buffer(path)
    try:
        cursor = buffer.cursor("cloud", LANES)
        buffer.cursor("erp", ["transaction"])
        made = [event(subject="4711"), event(), event("telemetry")]
        await buffer.append(made)
        batch = await cursor.next_batch(1000, wait=False)
        cursor.settle(batch, [Rejected("bad item"), ACKED, ACKED])
        await buffer.commit_now()

        stats = await inspect_stats(path, ["cloud", "erp"])
        assert stats.sinks["cloud"].depth == 0
        assert stats.sinks["erp"].depth == 2
        assert stats.dead_letters == 1
        assert stats.size_bytes > 0
        letters = await inspect_dead_letters(path)
        assert [(d.id, d.sink, d.reason, d.subject) for d in letters] == [(made[0].id, "cloud", "bad item", "4711")]
        assert await inspect_dead_letters(path, "erp") == []
        assert len(await inspect_dead_letters(path, "cloud")) == 1

        # the writer is not disturbed
        await buffer.append([event()])
        assert len(await take_all(buffer, cursor)) == 1
        assert (await inspect_stats(path, ["cloud", "erp"])).sinks["erp"].depth == 3
    finally:
        await buffer.close()
    with pytest.raises(FileNotFoundError):
        await inspect_stats(tmp_path / "nothing.db", ["cloud"])


# --- property: nothing is lost ---------------------------------------------------------------------

SINKS: dict[str, tuple[Lane, ...]] = {"a": ("transaction", "telemetry"), "b": ("transaction", "operational")}

outcome_strategy = st.one_of(st.just(ACKED), st.just(RETRY), st.builds(Rejected, st.sampled_from(["r1", "r2"])))
op_strategy = st.one_of(
    st.tuples(st.just("append"), st.lists(st.sampled_from(LANES), min_size=1, max_size=4)),
    st.tuples(st.just("take"), st.sampled_from(sorted(SINKS)), st.sampled_from([1, 2, 5, 1000])),
    st.tuples(st.just("settle"), st.sampled_from(sorted(SINKS)), st.lists(outcome_strategy, max_size=8)),
    st.tuples(st.just("commit")),
    st.tuples(st.just("reopen")),
)


async def _scenario(path: Path, ops: list[tuple[Any, ...]]) -> None:
    buffer = await open_buffer(path, synchronous="NORMAL")
    cursors = {name: buffer.cursor(name, lanes) for name, lanes in SINKS.items()}
    appended: dict[str, CloudEvent] = {}
    outstanding: dict[str, list[BufferedEvent]] = {}
    acked: dict[str, set[str]] = {name: set() for name in SINKS}
    bodies: dict[str, bytes] = {}
    try:
        for op in ops:
            if op[0] == "append":
                made = [event(lane) for lane in op[1]]
                appended.update((e.id, e) for e in made)
                await buffer.append(made)
            elif op[0] == "take" and op[1] not in outstanding:
                outstanding[op[1]] = await cursors[op[1]].next_batch(op[2], wait=False)
            elif op[0] == "settle" and op[1] in outstanding:
                batch = outstanding.pop(op[1])
                outcomes = (list(op[2]) + [ACKED] * len(batch))[: len(batch)]
                settlement = cursors[op[1]].settle(batch, outcomes)
                acked[op[1]].update(item.id for item in settlement.acked)
                for item in batch:
                    assert bodies.setdefault(item.id, item.body) == item.body  # same id, same body
            elif op[0] == "commit":
                await buffer.commit_now()
            elif op[0] == "reopen":
                await buffer.close()
                buffer = await open_buffer(path, synchronous="NORMAL")
                cursors = {name: buffer.cursor(name, lanes) for name, lanes in SINKS.items()}
                outstanding.clear()  # unsettled at the restart: handed out again
        for name, cursor in cursors.items():
            taken = await take_all(buffer, cursor)
            acked[name].update(item.id for item in taken)
            assert cursor.depth() == 0
        await buffer.commit_now()
        letters = await buffer.dead_letters()
    finally:
        await buffer.close()
    for name, lanes in SINKS.items():
        expected = {event_id for event_id, e in appended.items() if e.lane in lanes}
        dead = {d.id for d in letters if d.sink == name}
        assert acked[name] | dead == expected, name
        assert dead <= expected
    for letter in letters:
        assert letter.body == encode_event(appended[letter.id])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op_strategy, max_size=25))
def test_random_interleavings_never_lose_an_event(ops: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(_scenario(Path(directory) / "buffer.db", ops))


async def test_a_full_buffer_evicts_telemetry_first_then_back_pressures_transactions(tmp_path: Path) -> None:
    buffer = await open_buffer(tmp_path / "buffer.db", max_size_mb=0.25)
    try:
        cursor = buffer.cursor("cloud", ["transaction", "telemetry"])
        await buffer.append([event("telemetry") for _ in range(400)])
        await buffer.append([event("transaction") for _ in range(200)])
        # Grow past the cap: maintain() first makes room from telemetry only...
        appended = 200
        for _ in range(500):
            await buffer.append([event("transaction") for _ in range(100)])
            appended += 100
            await buffer.maintain()
            await buffer.commit_now()
            if buffer.refusing_writes is not None:
                break
        assert buffer.depth("cloud", "transaction") == appended, "no transaction is ever evicted"
        assert buffer.depth("cloud", "telemetry") < 400
        assert buffer.evictions, "telemetry eviction is reported"
        # ...then, with the telemetry gone, refuses writes: sources wait in wait_writable().
        assert buffer.refusing_writes is not None and "full" in buffer.refusing_writes
        waiter = asyncio.create_task(buffer.wait_writable())
        await asyncio.sleep(0)  # let the waiter reach its wait (not synchronisation: it must still wait)
        assert not waiter.done()
        # Delivering makes room again: writes are accepted.
        while cursor.depth():
            batch = await cursor.next_batch(1000)
            cursor.settle(batch, [ACKED] * len(batch))
        await buffer.commit_now()
        await buffer.maintain()
        assert buffer.refusing_writes is None
        await asyncio.wait_for(waiter, 5)
    finally:
        await buffer.close()
