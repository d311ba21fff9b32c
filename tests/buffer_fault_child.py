"""A buffer in a child process that stops at a chosen point so the parent can SIGKILL it there.

``python tests/buffer_fault_child.py PATH POINT`` with POINT one of:

- ``commit``: one group committed, then the next group's transaction blocks at its
  COMMIT (its rows are inserted, not committed);
- ``ack``: a batch is acknowledged by the "sink" (``settle``) and the process blocks
  before the commit that would store the cursor;
- ``delete``: a batch is acknowledged and the process blocks inside the DELETE of
  the delivered rows, in the transaction that also stores the cursor.

It prints ``committed <id>...`` for every group whose append future resolved (the
promise the parent checks: those must never be lost), ``acked <id>...`` for what the
sink acknowledged, then ``at <point>`` and blocks until it is killed. Blocking happens
in SQLite's own callbacks (trace, progress) on the writer's thread, or in the event
loop itself, so nothing of the buffer is replaced.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from agent.events import CloudEvent, make_event
from agent.sink import ACKED
from buffer import Buffer

LANES = ("transaction", "operational", "telemetry")


def say(*words: object) -> None:
    print(*words, flush=True)


def block_forever() -> None:
    while True:
        time.sleep(3600)


def events(first: int, count: int) -> list[CloudEvent]:
    return [
        make_event(
            "production.completed",
            id=f"fact-{n}",
            source="plantgate/plant-01/gw/press7",
            time=datetime(2024, 5, 1, tzinfo=UTC),
            site="plant-01",
            subject=f"WO-{n}",
            data={"n": n},
        )
        for n in range(first, first + count)
    ]


async def append(buffer: Buffer, made: list[CloudEvent]) -> None:
    await buffer.append(made)
    say("committed", *(e.id for e in made))


async def main(path: Path, point: str) -> None:
    buffer = Buffer(path)
    await buffer.open()
    cursor = buffer.cursor("cloud", LANES)
    await buffer.commit_now()
    writer = buffer._db  # the writer connection, to watch its statements
    assert writer is not None
    await append(buffer, events(0, 10))
    await append(buffer, events(10, 10))

    if point == "commit":

        def at_commit(statement: str) -> None:
            if statement.strip().upper().startswith("COMMIT"):
                say("at commit")
                block_forever()

        await writer.set_trace_callback(at_commit)
        await append(buffer, events(20, 10))  # never resolves: blocked at its COMMIT

    batch = await cursor.next_batch(15, wait=False)
    cursor.settle(batch, [ACKED] * len(batch))
    say("acked", *(item.id for item in batch))

    if point == "ack":
        say("at ack")
        block_forever()  # the event loop stops here: the cursor commit never starts

    if point == "delete":
        deleting = threading.Event()

        def watch(statement: str) -> None:
            if statement.strip().upper().startswith("DELETE FROM LANE_"):
                deleting.set()

        def progress() -> int:
            if deleting.is_set():
                say("at delete")
                block_forever()
            return 0

        await writer.set_trace_callback(watch)
        await writer.set_progress_handler(progress, 1)
        await buffer.commit_now()  # never resolves: blocked inside the DELETE
    say("not reached")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2]))
