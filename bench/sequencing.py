"""Scenario ``sequencing``: durable ingest through the sequencing guard, in process.

Every work order gets ``PER_ORDER - 1`` ``material.consumed`` events before its
``workorder.released`` (the worst case: each consumption is held, written to the
``held`` table, then moved into the transaction lane behind the release, in the
release's group commit). Appended in groups of ``GROUP`` the way a source does it;
every commit future is awaited (synchronous FULL). The figure counts events
appended per second, held ones included; at the end nothing may still be held.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.events import CloudEvent, Quantity, make_event
from agent.settings import SequencingRule
from bench.common import Row, ScenarioResult, memory_mb, target_min, workdir
from bench.ingest import append_timed
from buffer import Buffer

GROUP = 500
PER_ORDER = 20
TARGET = 50_000
SITE = "bench"
SOURCE = f"plantgate/{SITE}/bench-agent/mes"
RULE = SequencingRule(type="material.consumed", after=["workorder.released"], hold="30m")


def event(index: int, base: datetime) -> CloudEvent:
    """Consumptions of a work order, then its release (the last of every ``PER_ORDER``)."""
    work_order = f"WO-{4_700_000 + index // PER_ORDER}"
    when = base + timedelta(milliseconds=index)
    if index % PER_ORDER == PER_ORDER - 1:
        return make_event(
            "workorder.released",
            id=f"rel-{index}",
            source=SOURCE,
            time=when,
            site=SITE,
            subject=work_order,
            data={"work_order": work_order},
        )
    return make_event(
        "material.consumed",
        id=f"con-{index}",
        source=SOURCE,
        time=when,
        site=SITE,
        subject=work_order,
        data={"work_order": work_order, "item": "RAW-7", "quantity": Quantity(value="2.5", uom="KGM")},
    )


def groups_of(count: int) -> Iterator[list[CloudEvent]]:
    base = datetime(2025, 1, 1, tzinfo=UTC)
    for first in range(0, count, GROUP):
        yield [event(i, base) for i in range(first, min(first + GROUP, count))]


async def _ingest(path: Path, groups: list[list[CloudEvent]]) -> dict[str, Any]:
    buffer = Buffer(path, sinks={"cloud": ["transaction"]}, sequencing=[RULE])
    await buffer.open()
    try:
        buffer.cursor("cloud", ["transaction"])
        count = sum(len(g) for g in groups)
        elapsed, window = await append_timed(buffer, groups)
        rss_after, hwm = memory_mb()
        held = buffer.held_summary().count
        if held or buffer.depth("cloud", "transaction") != count:
            raise RuntimeError(f"sequencing bench: {held} still held, depth {buffer.depth('cloud', 'transaction')}")
        return {
            "events": count,
            "seconds": elapsed,
            "events_per_s": count / elapsed,
            "cpu_cores": window.cores,
            "rss_after_mb": rss_after,
            "vmhwm_mb": hwm,
            "held_at_end": held,
        }
    finally:
        await buffer.close()


def run(quick: bool = False) -> ScenarioResult:
    """The guarded ingest; see the module docstring."""
    count = 20_000 if quick else 200_000
    result = ScenarioResult("sequencing", "durable ingest through the sequencing guard (in process)", quick=quick)
    groups = list(groups_of(count))
    gc.collect()
    gc.freeze()
    try:
        with workdir("sequencing") as tmp:
            figures = asyncio.run(_ingest(tmp / "buffer.db", groups))
    finally:
        gc.unfreeze()
    figures.update({"group": GROUP, "per_order": PER_ORDER})
    result.figures = figures
    rate = figures["events_per_s"]
    result.rows.append(
        Row(
            "k sequencing",
            "events/s durable",
            rate,
            "ev/s",
            f">= {TARGET:,}",
            target_min(rate, TARGET),
            "",
            figures["cpu_cores"],
            figures["rss_after_mb"],
            f"{count:,} events, {PER_ORDER - 1} of {PER_ORDER} held then released behind their order's release",
        )
    )
    return result
