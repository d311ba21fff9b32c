"""Scenario ``ingest`` (a): durable ingest of transaction events into the SQLite buffer, in process.

Pre-built canonical ``production.completed`` events (work order, item, quantity as
an exact decimal with its unit) are appended in groups of ``GROUP`` the way a source
does it (``await buffer.wait_writable(); buffer.append(group)``); every commit
future is awaited, so the figure counts only events that are durable (synchronous
FULL, the default). CPU is this process's (``/proc/self/stat``, every thread,
including aiosqlite's) over the timed window; RSS before and after.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from agent.events import CloudEvent, Quantity, make_event
from bench.common import CpuWindow, Row, ScenarioResult, memory_mb, target_min, workdir
from buffer import Buffer

GROUP = 500
TARGET = 150_000
SITE = "bench"
SOURCE = f"plantgate/{SITE}/bench-agent/mes"
_ITEMS = ("40012345000017", "40012345000024", "40012345000031", "FILL-500", "P-200-A", "P-300-B")
_UOMS = ("EA", "KGM", "MTR")


def event_id(index: int) -> str:
    """A distinct UUID-shaped id whose last 12 digits are ``index`` (subscribers parse it back)."""
    return f"00000000-0000-4000-8000-{index:012d}"


def index_of(event_id_text: str) -> int:
    """The inverse of ``event_id``."""
    return int(event_id_text[-12:])


def transaction(index: int, base: datetime) -> CloudEvent:
    """One realistic ``production.completed`` event."""
    work_order = f"WO-{4_700_000 + index // 20}"
    quantity = Decimal(10 + index % 490) / 4
    return make_event(
        "production.completed",
        id=event_id(index),
        source=SOURCE,
        time=base + timedelta(milliseconds=index),
        site=SITE,
        subject=work_order,
        partitionkey=work_order,
        correlationid=f"cycle-{index}",
        data={
            "work_order": work_order,
            "item": _ITEMS[index % len(_ITEMS)],
            "quantity": Quantity(value=str(quantity), uom=_UOMS[index % len(_UOMS)]),
            "line": "line3",
            "station": f"press{index % 8}",
        },
    )


def transactions(start: int, count: int, group: int = GROUP) -> Iterator[list[CloudEvent]]:
    """``count`` events from index ``start``, in groups of ``group``."""
    base = datetime(2025, 1, 1, tzinfo=UTC)
    for first in range(start, start + count, group):
        yield [transaction(i, base) for i in range(first, min(first + group, start + count))]



async def append_timed(buffer: Buffer, groups: list[list[CloudEvent]]) -> tuple[float, CpuWindow]:
    """Append ``groups`` as a source does (wait while the buffer refuses, one call per group) and await
    every commit: the wall time and this process's CPU over it."""
    window = CpuWindow().start()
    t0 = time.perf_counter()
    futures = []
    for group in groups:
        await buffer.wait_writable()
        futures.append(buffer.append(group))
    await asyncio.gather(*futures)
    elapsed = time.perf_counter() - t0
    window.stop()
    return elapsed, window

async def _ingest(path: Path, groups: list[list[CloudEvent]]) -> dict[str, Any]:
    buffer = Buffer(path)  # synchronous FULL by default
    await buffer.open()
    try:
        rss_before, _ = memory_mb()
        count = sum(len(g) for g in groups)
        elapsed, window = await append_timed(buffer, groups)
        rss_after, hwm = memory_mb()
        file_mb = path.stat().st_size / 1e6  # noqa: ASYNC240 (after the timed window)
        return {
            "events": count,
            "seconds": elapsed,
            "events_per_s": count / elapsed,
            "cpu_cores": window.cores,
            "cpu_seconds": window.cpu,
            "rss_before_mb": rss_before,
            "rss_after_mb": rss_after,
            "vmhwm_mb": hwm,
            "last_sequence": buffer.last_sequence,
            "duplicates_suppressed": buffer.duplicates_suppressed,
            "file_mb": file_mb,
        }
    finally:
        await buffer.close()


def run(quick: bool = False) -> ScenarioResult:
    """Scenario (a); see the module docstring."""
    count = 50_000 if quick else 600_000
    result = ScenarioResult("ingest", "durable ingest into the buffer (in process, synchronous FULL)", quick=quick)
    build = time.perf_counter()
    groups = list(transactions(0, count))
    build_s = time.perf_counter() - build
    # The pre-built events stand for what sources hand over one group at a time; keep the
    # collector from rescanning all of them in every full pass (an artifact of pre-building).
    gc.collect()
    gc.freeze()
    try:
        with workdir("ingest") as tmp:
            figures = asyncio.run(_ingest(tmp / "buffer.db", groups))
    finally:
        gc.unfreeze()
    figures.update({"group": GROUP, "synchronous": "FULL", "build_seconds": build_s})
    result.figures = figures
    rate = figures["events_per_s"]
    result.rows.append(
        Row(
            "a ingest",
            "events/s durable",
            rate,
            "ev/s",
            f">= {TARGET:,}",
            target_min(rate, TARGET),
            "",
            figures["cpu_cores"],
            figures["rss_after_mb"],
            f"{count:,} events in groups of {GROUP}; RSS incl. the pre-built events "
            f"({figures['rss_before_mb']:.0f} MB before)",
        )
    )
    return result
