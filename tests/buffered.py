"""What buffer tests share: draining a cursor the way a sink that acknowledges everything would."""

from __future__ import annotations

from agent.sink import ACKED, BufferedEvent
from buffer import Buffer, DeliveryCursor


async def take_all(buffer: Buffer, cursor: DeliveryCursor) -> list[BufferedEvent]:
    """Everything the cursor hands out now, acknowledged batch by batch (committed)."""
    taken: list[BufferedEvent] = []
    while batch := await cursor.next_batch(1000, wait=False):
        taken.extend(batch)
        cursor.settle(batch, [ACKED] * len(batch))
        await buffer.commit_now()
    return taken
