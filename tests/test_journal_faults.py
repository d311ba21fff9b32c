"""The delivery journal keeps the buffer's promise under ``kill -9``: exactly what committed, nothing else.

A child process appends and settles through a real ``Buffer`` and stops at a chosen
point inside a commit (SQLite's own trace callback on the writer's thread blocks at
a ``COMMIT``); the parent SIGKILLs it there, reopens the file and compares the
journal with what the child was told is durable and with the rows the lanes hold.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from agent.sink import ACKED
from buffer import Buffer
from buffer.store import unpack_segment

REPO = Path(__file__).parent.parent

CHILD = r"""
import asyncio
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from agent.events import make_event
from agent.sink import ACKED, RetryLater
from buffer import Buffer, OutcomeReport


def say(*words):
    print(*words, flush=True)


def events(first, count, work_order):
    return [
        make_event(
            "production.completed",
            id=f"fact-{n}",
            source="plantgate/plant-01/gw/press7",
            time=datetime(2024, 5, 1, tzinfo=UTC),
            site="plant-01",
            data={"work_order": work_order, "n": n},
        )
        for n in range(first, first + count)
    ]


async def main(path, point):
    buffer = Buffer(path, max_rows_per_commit=7 if point == "split" else 5000)
    await buffer.open()
    cursor = buffer.cursor("cloud", ["transaction"])
    await buffer.commit_now()
    made = events(0, 10, "WO-1")
    await buffer.append(made, contexts={e.id: {"source": "press7", "rule": "count", "values": {}} for e in made})
    say("committed", *(e.id for e in made))
    batch = await cursor.next_batch(6, wait=False)
    cursor.settle(batch, [ACKED] * 3 + [RetryLater(reason="HTTP 503")] * 3)
    await buffer.commit_now()
    say("acked", *(e.id for e in batch[:3]))
    commits = 0

    def at_commit(statement):
        nonlocal commits
        if statement.strip().upper().startswith("COMMIT"):
            commits += 1
            if commits == (2 if point == "split" else 1):
                say("at", point)
                while True:
                    time.sleep(3600)

    await buffer._db.set_trace_callback(at_commit)
    if point == "outcome":
        await buffer.record_outcomes([OutcomeReport("fact-0", "posted", reference="4711")])
    else:
        batch = await cursor.next_batch(10, wait=False)
        cursor.settle(batch, [ACKED] * len(batch))
        await buffer.append(events(10, 20, "WO-2"))
    say("not reached")


asyncio.run(main(Path(sys.argv[1]), sys.argv[2]))
"""


def run_child_until_killed(path: Path, point: str) -> dict[str, list[str]]:
    """Run the child until it reports ``at <point>``, SIGKILL it there; what it said before."""
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), point],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    said: dict[str, list[str]] = {"committed": [], "acked": []}
    try:
        assert process.stdout is not None
        for line in process.stdout:  # bounded: the child prints a handful of lines, pytest-timeout backs it
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


def lane_ids(path: Path) -> set[str]:
    """The ids of the events the transaction lane holds, as another connection sees the file."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT events FROM lane_transaction").fetchall()
    return {event.id for (blob,) in rows for event in unpack_segment(blob)}


def journal_ids(path: Path) -> set[str]:
    """The ids the journal holds, as another connection sees the file: its segments' and its held entries'."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        segments = db.execute("SELECT events FROM journal_segments").fetchall()
        held = {str(row[0]) for row in db.execute("SELECT id FROM journal_held")}
    return held | {event.id for (blob,) in segments for event in unpack_segment(blob)}


@pytest.mark.parametrize("point", ["commit", "split"])
async def test_after_a_kill_the_journal_holds_exactly_the_committed_events_and_steps(
    tmp_path: Path, point: str
) -> None:
    path = tmp_path / "buffer.db"
    said = run_child_until_killed(path, point)
    assert said["committed"] == [f"fact-{n}" for n in range(10)]
    assert said["acked"] == ["fact-0", "fact-1", "fact-2"]
    # Exactly the events that committed: every one the child was told of, and what the lane holds.
    in_lane = lane_ids(path)
    assert journal_ids(path) == set(said["committed"]) | in_lane
    if point == "split":
        # The first transaction of the split group committed (with its entries), the rest did not.
        assert in_lane - set(said["committed"]) == {f"fact-{n}" for n in range(10, 17)}
    else:
        assert in_lane <= set(said["committed"])
    buffer = Buffer(path)
    await buffer.open()
    try:
        entries = {entry.id: entry for entry in await buffer.trace("WO-1")}
        assert sorted(entries) == sorted(said["committed"])
        for n in range(10):
            entry = entries[f"fact-{n}"]
            assert entry.trigger == {"source": "press7", "rule": "count", "values": {}}
            steps = [(step.step, step.sink, step.status) for step in entry.steps]
            if n < 3:
                assert steps == [("committed", None, None), ("acked", "cloud", "ok")]
                assert entry.delivered is not None
            elif n < 6:
                # The acknowledgement settled in the killed commit is not there: only the attempt is.
                assert steps == [("committed", None, None), ("attempt", "cloud", "HTTP 503")]
                assert entry.delivered is None
            else:
                assert steps == [("committed", None, None)]
        summary = await buffer.outcome_summary()
        assert summary["io.plantgate.production.completed"].unconfirmed == 3
        # The journal goes on from here: the events still in the lane are delivered and journaled.
        cursor = buffer.cursor("cloud", ["transaction"])
        batch = await cursor.next_batch(100, wait=False)
        assert {e.id for e in batch} == in_lane - {"fact-0", "fact-1", "fact-2"}
        cursor.settle(batch, [ACKED] * len(batch))
        await buffer.commit_now()
        found = await buffer.journal_entries([e.id for e in batch])
        assert all(entry.delivered is not None for entry in found.values()) and len(found) == len(batch)
    finally:
        await buffer.close()


async def test_an_outcome_killed_in_its_commit_is_not_recorded_and_the_counts_stay_exact(tmp_path: Path) -> None:
    path = tmp_path / "buffer.db"
    run_child_until_killed(path, "outcome")
    buffer = Buffer(path)
    await buffer.open()
    try:
        (entry,) = await buffer.trace("fact-0")
        assert entry.outcome is None and entry.reference is None
        counts = (await buffer.outcome_summary())["io.plantgate.production.completed"]
        assert (counts.unconfirmed, counts.confirmed, counts.rejected) == (3, 0, 0)
    finally:
        await buffer.close()
