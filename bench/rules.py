"""Scenario ``rules``: the rule stage alone, in process, on one core.

10,000 ``telemetry`` tags with a deadband plus 100 ``[[transactions]]`` rules (each a
bool trigger, a work order, a counter quantity and a condition on a state tag), fed
as pre-built batches of 1,000 readings the way an OPC UA publish hands them over:
``Rules.process(source, batch)``, nothing else (no buffer, no encoding). Telemetry
values walk randomly so about half of the changes stay inside their deadband; every
trigger toggles once per 2 batches, so half of its readings are rising edges.
Readings/s in, events/s out (telemetry.samples events, transactions and state
changes), samples forwarded/s and transactions/s; this process's CPU.
"""

from __future__ import annotations

import gc
import random
import time
from datetime import UTC, datetime, timedelta

from agent.events import Reading
from agent.rules import Rules
from agent.settings import parse_settings
from bench.common import CpuWindow, Row, ScenarioResult, memory_mb, target_min

TARGET = 100_000
TELEMETRY_TAGS = 10_000
RULES = 100
BATCH = 1_000
SOURCE = "line"


def config() -> str:
    """The site config: one OPC UA source with every tag, and the rules."""
    lines = [
        '[agent]\nsite = "bench"\nid = "bench-agent"\ndata_dir = "/tmp/plantgate-bench-rules"\n',
        f'[[sources.opcua]]\nname = "{SOURCE}"\nendpoint = "opc.tcp://127.0.0.1:4840"\n',
    ]
    for index in range(TELEMETRY_TAGS):
        lines.append(
            f'[[sources.opcua.tags]]\ntag = "t{index}"\nnode = "ns=2;s=T{index}"\nkind = "telemetry"\ndeadband = 0.5\n'
        )
    lines.append('[[sources.opcua.tags]]\ntag = "state"\nnode = "ns=2;s=State"\nkind = "state"\n'
                 'states = { 0 = "stopped", 1 = "running" }\n')
    for index in range(RULES):
        for name, kind in ((f"done{index}", "value"), (f"wo{index}", "value"), (f"count{index}", "counter")):
            lines.append(f'[[sources.opcua.tags]]\ntag = "{name}"\nnode = "ns=2;s={name}"\nkind = "{kind}"\n')
    for index in range(RULES):
        lines.append(
            f'[[transactions]]\nname = "rule{index}"\nwhen = "done{index}"\ntype = "production.completed"\n'
            f'fields = {{ work_order = "wo{index}", quantity = "count{index}", line = {{ literal = "L3" }} }}\n'
            'uom = "EA"\ncondition = { tag = "state", equals = "running" }\n'
        )
    return "\n".join(lines)


def batches(count: int, seed: int = 7) -> list[list[Reading]]:
    """``count`` batches of ``BATCH`` readings: 90 % telemetry, the rest triggers, work orders and counters."""
    rng = random.Random(seed)
    base = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
    values = [20.0] * TELEMETRY_TAGS
    counts = [0] * RULES
    out: list[list[Reading]] = [[Reading("state", 1, base)]]
    tick = 0
    for number in range(count):
        batch: list[Reading] = []
        per_rule = (BATCH // 10) // 3
        for slot in range(per_rule):
            rule = (number * per_rule + slot) % RULES
            tick += 1
            at = base + timedelta(milliseconds=tick)
            counts[rule] += rng.randint(1, 5)
            batch.append(Reading(f"wo{rule}", 4_700_000 + tick // 50, at))
            batch.append(Reading(f"count{rule}", counts[rule], at))
            batch.append(Reading(f"done{rule}", (number // 2 + rule) % 2 == 0, at))
        while len(batch) < BATCH:
            tag = rng.randrange(TELEMETRY_TAGS)
            tick += 1
            values[tag] += rng.uniform(-1.0, 1.0)
            batch.append(Reading(f"t{tag}", round(values[tag], 3), base + timedelta(milliseconds=tick)))
        out.append(batch)
    return out


def run(quick: bool = False) -> ScenarioResult:
    """The scenario; see the module docstring."""
    count = 100 if quick else 1_000
    result = ScenarioResult("rules", "rule stage alone: 10,000 deadband tags + 100 transaction rules", quick=quick)
    build = time.perf_counter()
    settings = parse_settings(config())
    rules = Rules(settings)
    work = batches(count)
    warm = batches(20, seed=11)
    build_s = time.perf_counter() - build
    for batch in warm:  # every tag seen once: the deadband reference and trigger levels exist
        rules.process(SOURCE, batch)
    gc.collect()
    gc.freeze()
    readings = events = samples = transactions = dead = 0
    try:
        window = CpuWindow().start()
        for batch in work:
            output = rules.process(SOURCE, batch)
            readings += len(batch)
            events += len(output.events)
            dead += len(output.dead_letters)
            for event in output.events:
                if event.lane == "transaction":
                    transactions += 1
                elif event.type.endswith("telemetry.samples"):
                    samples += len(event.data.samples)
        window.stop()
    finally:
        gc.unfreeze()
    rss, hwm = memory_mb()
    wall = window.wall
    result.figures = {
        "readings": readings,
        "batches": len(work),
        "batch": BATCH,
        "seconds": wall,
        "readings_per_s": readings / wall,
        "events_per_s": events / wall,
        "samples_per_s": samples / wall,
        "transactions_per_s": transactions / wall,
        "events": events,
        "samples": samples,
        "transactions": transactions,
        "dead_letters": dead,
        "cpu_cores": window.cores,
        "rss_mb": rss,
        "vmhwm_mb": hwm,
        "build_seconds": build_s,
    }
    rate = readings / wall
    note = (
        f"{readings:,} readings in batches of {BATCH}; out: {events / wall:,.0f} events/s "
        f"({samples / wall:,.0f} samples/s, {transactions / wall:,.0f} transactions/s)"
    )
    result.rows.append(
        Row("rules", "readings/s in", rate, "rd/s", f">= {TARGET:,}", target_min(rate, TARGET), "",
            window.cores, rss, note)
    )
    result.rows.append(Row("rules", "events/s out", events / wall, "ev/s", "", None, "", window.cores, rss, ""))
    return result


if __name__ == "__main__":
    for row in run(quick=True).rows:
        print(row)
